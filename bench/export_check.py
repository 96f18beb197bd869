"""Export check on the reference model: perplexity and max |dlogit| of moecarve vs the exported model.

    python bench/export_check.py CHARS CONFIGS [OUT_ROOT]     e.g.  200000 S2A2E8,S1A1E8 /tmp/export-check

Perplexity on the first CHARS characters of test.txt (seq 512, float32); calibration 8x512 tokens of
calib.txt, seed 0. Linear router first (moecarve and the exported Qwen2-MoE model evaluated on the
same windows), the analytic router afterwards.
"""
import math, sys, torch
import torch.nn.functional as F
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer
from moecarve import carve, CarveConfig, CalibConfig, load_windows
from moecarve.eval.perplexity import perplexity, test_windows
from moecarve.export import export
ref = "../shared/reference-lm"; chars = int(sys.argv[1])
root = sys.argv[3] if len(sys.argv) > 3 else "/tmp/export-check"
tok = AutoTokenizer.from_pretrained(ref)
win = load_windows(tok, CalibConfig(source="../shared/corpus/calib.txt", n_samples=8, seqlen=512))
ev = test_windows(tok, open("../shared/corpus/test.txt").read(), 512, chars)
fresh = lambda: AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
print(f"windows {tuple(ev.shape)}", flush=True)
names = sys.argv[2].split(",")
for name in names:
    m = fresh()
    carve(m, CarveConfig.from_string(name, method="cmoe", router="linear"), win, device="cpu", progress=False)
    out = f"{root}/{name}-qwen2_moe"
    export(m, "qwen2_moe", out, tokenizer=tok, overwrite=True)
    q = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    nll_m = nll_q = 0.0; n = 0; dmax = 0.0
    with torch.no_grad():
        for s in range(0, ev.shape[0], 4):
            ids = ev[s:s + 4]
            a, b = m(input_ids=ids).logits, q(input_ids=ids).logits
            dmax = max(dmax, (a - b).abs().max().item())
            tgt = ids[:, 1:].reshape(-1)
            nll_m += F.cross_entropy(a[:, :-1].reshape(-1, a.shape[-1]), tgt, reduction="sum").item()
            nll_q += F.cross_entropy(b[:, :-1].reshape(-1, b.shape[-1]), tgt, reduction="sum").item()
            n += tgt.numel()
    print(f"{name} linear: moecarve ppl {math.exp(nll_m / n):.4f}; exported {type(q).__name__} ppl {math.exp(nll_q / n):.4f}; "
          f"max |dlogit| {dmax:.3g}", flush=True)
for name in names:
    m = fresh()
    carve(m, CarveConfig.from_string(name, method="cmoe", router="analytic"), win, device="cpu", progress=False)
    print(f"{name} analytic: ppl {perplexity(m, ev, batch_size=4):.4f}", flush=True)
