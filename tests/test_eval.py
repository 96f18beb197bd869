"""Evaluation: the perplexity protocol, test-set loading, lm_eval on in-memory models, compare and plots."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from moecarve.cli import main
from moecarve.eval.data import EvalDataError, load_eval_text
from moecarve.eval.perplexity import eval_perplexity, eval_windows, perplexity
from moecarve.eval.tasks import TaskConfig, TaskError
from tests.conftest import REFERENCE_LM, TEST_TXT, random_windows, tiny_model

needs_reference = pytest.mark.skipif(not REFERENCE_LM.exists(), reason="../shared/reference-lm is not available")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def carved_dir(tmp_path_factory):
    """The reference model carved at S2A6E8 (every expert active, so it computes the dense FFN), saved."""
    import transformers

    from moecarve import CarveConfig, carve, save
    from moecarve.calibration import tokenize_windows

    if not REFERENCE_LM.exists():
        pytest.skip("../shared/reference-lm is not available")
    tok = transformers.AutoTokenizer.from_pretrained(REFERENCE_LM)
    windows = tokenize_windows(tok, TEST_TXT.read_text()[300_000:400_000], n_samples=2, seqlen=128, seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(REFERENCE_LM, dtype=torch.float32).eval()
    report = carve(model, CarveConfig.from_string("S2A6E8"), windows, device="cpu", progress=False)
    return save(model, tmp_path_factory.mktemp("carved") / "S2A6E8", tokenizer=tok, report=report)


# --- perplexity protocol -------------------------------------------------------------------------


@needs_reference
def test_protocol_equals_direct_full_model_computation(reference_model, reference_tokenizer):
    text = TEST_TXT.read_text()[:8_000]
    seqlen = 256
    windows = eval_windows(reference_tokenizer, str(TEST_TXT), seqlen, max_chars=8_000)
    # the windows are the text tokenized once, cut into consecutive non-overlapping pieces
    ids = reference_tokenizer(text, add_special_tokens=False).input_ids
    assert windows.shape == (len(ids) // seqlen, seqlen)
    assert windows.flatten().tolist() == ids[: windows.numel()]
    # direct: HF's own mean next-token loss per window (equal token counts -> plain mean), exp
    with torch.no_grad():
        losses = [reference_model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    direct = math.exp(sum(losses) / len(losses))
    result = eval_perplexity(reference_model, reference_tokenizer, str(TEST_TXT), seqlen, 8_000, batch_size=3)
    assert result.perplexity == pytest.approx(direct, rel=1e-5)
    assert (result.n_windows, result.n_tokens) == (windows.shape[0], windows.shape[0] * (seqlen - 1))
    assert perplexity(reference_model, windows, batch_size=1) == pytest.approx(direct, rel=1e-5)


@needs_reference
def test_seqlen_is_clipped_to_max_positions(reference_model, reference_tokenizer):
    result = eval_perplexity(reference_model, reference_tokenizer, str(TEST_TXT), seqlen=4096, max_chars=9_000)
    assert result.seqlen == reference_model.config.max_position_embeddings


@needs_reference
@pytest.mark.skipif(importlib.util.find_spec("moecarve.eval.streaming") is None, reason="no moecarve.eval.streaming")
def test_cli_layerwise_matches_full_model(tmp_path):
    args = ["eval", str(REFERENCE_LM), "--ppl", str(TEST_TXT), "--seqlen", "256", "--max-chars", "8000", "--device", "cpu"]
    assert main(args + ["--json", str(tmp_path / "full.json")]) == 0
    assert main(args + ["--layerwise", "--json", str(tmp_path / "lw.json")]) == 0
    full, lw = (json.loads((tmp_path / f).read_text())["perplexity"] for f in ("full.json", "lw.json"))
    assert lw["n_windows"] == full["n_windows"]
    assert lw["perplexity"] == pytest.approx(full["perplexity"], rel=1e-4)


@needs_reference
@pytest.mark.skipif(importlib.util.find_spec("moecarve.eval.streaming") is None, reason="no moecarve.eval.streaming")
def test_cli_layerwise_reads_a_carved_folder(tmp_path, reference_tokenizer):
    """A carved folder's tokenizer and config are read without its remote code (model_type moecarve_llama)."""
    from moecarve import CarveConfig, carve, save

    model = tiny_model("llama", vocab_size=len(reference_tokenizer))  # max positions 128: --ppl-seqlen is clipped
    carve(model, CarveConfig.from_string("S1A1E4", method="cmoe"), random_windows(2, 32, vocab=len(reference_tokenizer)),
          progress=False)  # fmt: skip
    save(model, tmp_path / "carved", tokenizer=reference_tokenizer)
    args = ["eval", str(tmp_path / "carved"), "--ppl", str(TEST_TXT), "--ppl-seqlen", "256", "--ppl-chars", "4000",
            "--device", "cpu"]  # fmt: skip
    assert main(args + ["--layerwise", "--json", str(tmp_path / "lw.json")]) == 0
    assert main(args + ["--json", str(tmp_path / "full.json")]) == 0
    full, lw = (json.loads((tmp_path / f).read_text())["perplexity"] for f in ("full.json", "lw.json"))
    assert lw["seqlen"] == full["seqlen"] == 128 and lw["n_windows"] == full["n_windows"]
    assert lw["perplexity"] == pytest.approx(full["perplexity"], rel=1e-4)


def test_task_rows_show_accuracy_with_its_standard_error():
    from moecarve.cli.eval import task_rows
    from moecarve.eval.tasks import TaskResult

    results = {"piqa": TaskResult("piqa", {"acc": 0.61, "acc_norm": 0.64}, stderr={"acc": 0.011, "acc_norm": 0.012}),
               "local": TaskResult("local", {"acc": 0.5})}  # fmt: skip
    assert task_rows(results) == [["piqa acc / acc_norm", "0.6100 ± 0.0110 / 0.6400 ± 0.0120"], ["local acc", "0.5000"]]


# --- test sets ---------------------------------------------------------------------------------------


def test_dataset_folder_documents_are_joined_with_blank_lines(tmp_path):
    import datasets

    docs = ["first document.", "", "second one\nwith two lines.", "third."]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["not this"]}),
                          "test": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(tmp_path / "ds")  # fmt: skip
    assert load_eval_text(str(tmp_path / "ds")) == "first document.\n\nsecond one\nwith two lines.\n\nthird."


def test_missing_sets_give_clear_errors(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants as hub

    # empty caches: whatever this machine has cached, the named sets must now be "missing"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for name in ("wikitext2", "c4"):
        with pytest.raises(EvalDataError, match="save_to_disk.*load_dataset"):
            load_eval_text(name)
    with pytest.raises(EvalDataError, match="neither wikitext2 nor c4"):
        load_eval_text(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(EvalDataError, match="no text"):
        load_eval_text(str(tmp_path / "empty.txt"))


def test_offline_switch_is_restored():
    import datasets
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    with pytest.raises(EvalDataError):
        load_eval_text("/definitely/not/here")
    from moecarve.eval.data import _offline

    with _offline():
        assert hub.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before


@needs_reference
def test_cli_errors_are_one_line_exit_2(tmp_path):
    assert main(["eval", str(REFERENCE_LM), "--ppl", str(tmp_path / "missing.txt")]) == 2
    assert main(["eval", str(REFERENCE_LM)]) == 2  # nothing to evaluate
    assert main(["eval", str(REFERENCE_LM), "--tasks", "piqa", "--layerwise"]) == 2  # layer-wise needs --ppl
    assert main(["eval", str(REFERENCE_LM), "--tasks", "piqa", "--fewshot", "-1"]) == 2


def test_task_config_validation(tmp_path):
    assert TaskConfig.parse("piqa, arc_easy").tasks == ("piqa", "arc_easy")
    for bad in (dict(tasks=()), dict(tasks=("piqa", " ")), dict(tasks=("piqa",), num_fewshot=-1),
                dict(tasks=("piqa",), limit=0), dict(tasks=("piqa",), include_path=str(tmp_path / "no"))):  # fmt: skip
        with pytest.raises(TaskError):
            TaskConfig(**bad)


# --- lm_eval on in-memory models ----------------------------------------------------------------------


@needs_reference
def test_local_task_same_accuracy_dense_and_all_experts_active(tmp_path, reference_model, reference_tokenizer, carved_dir):
    from moecarve.eval.mctask import TASK_NAME, build_examples, write_task
    from moecarve.eval.tasks import run_tasks
    from moecarve.io.save import load

    folder = write_task(tmp_path / "task", build_examples(TEST_TXT.read_text()[200_000:300_000], n=12, seed=1))
    cfg = TaskConfig((TASK_NAME,), num_fewshot=0, include_path=str(folder), batch_size=8)
    dense = run_tasks(reference_model, reference_tokenizer, cfg)[TASK_NAME]
    carved = run_tasks(load(carved_dir, dtype=torch.float32), reference_tokenizer, cfg)[TASK_NAME]
    assert dense.n_samples == carved.n_samples == 12
    assert 0.0 <= dense.accuracy <= 1.0
    assert carved.metrics["acc"] == dense.metrics["acc"]
    assert carved.metrics["acc_norm"] == dense.metrics["acc_norm"]
    # what a reader needs besides acc: standard errors, sample counts, few-shot count, versions
    p = dense.metrics["acc"]
    assert dense.stderr["acc"] == pytest.approx(math.sqrt(p * (1 - p) / 11))  # lm_eval's sample stderr of a mean
    assert set(dense.stderr) == {"acc", "acc_norm"} and dense.n_original == 12 and dense.num_fewshot == 0
    assert dense.version is not None
    from importlib.metadata import version

    from moecarve.eval.tasks import task_report

    doc = json.loads(json.dumps(task_report({TASK_NAME: dense}, cfg)))
    assert doc["lm_eval_version"] == version("lm_eval") and doc["settings"]["num_fewshot"] == 0
    assert doc["tasks"][TASK_NAME]["stderr"]["acc_norm"] == dense.stderr["acc_norm"]


def test_harness_entries_keep_stderr_and_skip_missing_ones():
    from moecarve.eval.tasks import _metrics

    entry = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "f1,none": 0.4, "f1_stderr,none": "N/A",
             "acc,strict": 0.2}  # fmt: skip
    assert _metrics(entry) == ({"acc": 0.5, "f1": 0.4}, {"acc": 0.1})


# --- compare and inspect --plot ------------------------------------------------------------------------------


@needs_reference
def test_compare_table_json_and_plot(tmp_path, reference_model, reference_tokenizer, carved_dir):
    out = tmp_path / "cmp"
    args = ["compare", str(REFERENCE_LM), str(carved_dir), "--ppl", str(TEST_TXT), "--seqlen", "128",
            "--max-chars", "6000", "--gen-tokens", "4", "--device", "cpu", "--dtype", "float32", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    doc = json.loads((out / "compare.json").read_text())
    dense, carved = doc["models"]
    # every routed expert active: the default shadow copy is 8-bit (CarveConfig.shadow_bits)
    assert (dense["method"], carved["method"]) == ("dense", "fitted, shadow 8-bit router")
    assert dense["seqlen"] == carved["seqlen"] == 128
    assert doc["settings"]["max_chars"] == 6000
    # the dense row is the protocol's perplexity of the dense model on the same windows
    windows = eval_windows(reference_tokenizer, str(TEST_TXT), 128, 6000)
    assert dense["perplexity"] == pytest.approx(perplexity(reference_model, windows), rel=1e-5)
    assert dense["delta_pct"] == 0.0 and dense["config"] == "dense" and dense["carve_seconds"] is None
    assert dense["params_active"] == dense["params_total"]
    assert carved["config"] == "S2A6E8" and carved["carve_seconds"] > 0
    assert carved["params_active"] == carved["params_total"]  # every routed expert is active
    assert carved["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-3)  # ... so it computes the dense model
    assert carved["delta_pct"] == pytest.approx(100 * (carved["perplexity"] / dense["perplexity"] - 1))
    assert all(r["tokens_per_s"] > 0 for r in doc["models"])
    assert (out / "compare.png").read_bytes()[:8] == PNG
    assert (doc["settings"]["kernels"], doc["settings"]["trust_remote_code"]) == ("none", False)  # how the models loaded


def test_compare_labels_are_unique_and_short(tmp_path):
    from moecarve.eval.compare import unique_labels

    for p in ("a/x/S2A2E8", "b/x/S2A2E8", "c/S1A1E8"):
        (tmp_path / p).mkdir(parents=True)
    paths = [str(tmp_path / p) for p in ("a/x/S2A2E8", "b/x/S2A2E8", "c/S1A1E8")]
    assert unique_labels(paths) == ["a/x/S2A2E8", "b/x/S2A2E8", "S1A1E8"]
    assert unique_labels(["org/model", str(tmp_path / "c" / "S1A1E8"), "org/model"]) == ["model", "S1A1E8", "model #2"]


def test_method_names_the_carve_router_and_condense(tmp_path):
    from types import SimpleNamespace

    from moecarve.eval.compare import method_of

    shadow = {"carve": {"method": "fitted"}, "modules": {"m": {"type": "moe", "router": "shadow", "shadow_bits": 4}}}
    cmoe = {"carve": {"method": "cmoe"}, "modules": {"m": {"type": "moe", "router": "analytic"}}, "condense": {"layers": [1]}}
    assert method_of(SimpleNamespace(moecarve=shadow), str(tmp_path)) == "fitted, shadow 4-bit router"
    assert method_of(SimpleNamespace(moecarve=cmoe), str(tmp_path)) == "cmoe, analytic router + CD-MoE"
    assert method_of(SimpleNamespace(), str(tmp_path)) == "dense"
    (tmp_path / "condense_report.json").write_text("{}")  # a condensed model saved in its own architecture
    assert method_of(SimpleNamespace(), str(tmp_path)) == "CD-MoE"


@needs_reference
def test_compare_rows_record_method_and_the_seqlen_used(tmp_path, reference_tokenizer):
    """Two folders with one basename get distinct labels; the window asked for (4096) is clipped to
    the models' 128 positions, and the rows say so."""
    import moecarve
    from moecarve.eval.compare import CompareConfig, compare, describe, write_json
    from tests.conftest import random_windows, tiny_model

    for kind in ("dense", "carved"):
        model = tiny_model("llama", vocab_size=len(reference_tokenizer))
        if kind == "dense":
            model.save_pretrained(tmp_path / kind / "m")
            reference_tokenizer.save_pretrained(tmp_path / kind / "m")
        else:
            moecarve.carve(model, moecarve.CarveConfig.from_string("S1A1E4"), random_windows(2, 32, vocab=8192), progress=False)
            moecarve.save(model, tmp_path / kind / "m", tokenizer=reference_tokenizer)
    cfg = CompareConfig(ppl=str(TEST_TXT), seqlen=4096, max_chars=3000, gen_tokens=0, device="cpu", dtype="float32")
    rows = compare([str(tmp_path / "dense" / "m"), str(tmp_path / "carved" / "m")], cfg)
    assert [r.name for r in rows] == ["dense/m", "carved/m"]
    assert [r.method for r in rows] == ["dense", "fitted, shadow 4-bit router"]
    assert [r.seqlen for r in rows] == [128, 128]
    assert describe(cfg, rows) == "test.txt, seq 128, first 3,000 chars"
    doc = json.loads(write_json(rows, cfg, tmp_path / "cmp.json").read_text())
    assert doc["settings"]["seqlen"] == 4096 and [m["seqlen"] for m in doc["models"]] == [128, 128]


def test_quality_plot_names_models_in_a_legend_not_on_the_points():
    from moecarve.eval.plots import quality_figure

    rows = [{"name": "a/S2A2E8", "method": "cmoe, analytic router", "params_active": 1e6, "perplexity": 10.0},
            {"name": "b/S2A2E8", "method": "fitted, shadow 4-bit router", "params_active": 1e6, "perplexity": 10.1,
             "tasks": {"piqa": 0.6}}]  # fmt: skip
    fig = quality_figure(rows)
    assert all(not ax.texts for ax in fig.axes)  # nothing drawn at the points that could overlap
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["a/S2A2E8 (cmoe, analytic router)", "b/S2A2E8 (fitted, shadow 4-bit router)"]


def test_histograms_and_load_titles_name_the_statistic_and_router(tmp_path):
    from moecarve import CarveConfig, CarveReport
    from moecarve.carving.methods import LayerReport
    from moecarve.eval.plots import plot_expert_load, plot_rate_histograms, statistic_title

    def report(method: str, statistic: str, router: str) -> CarveReport:
        layer = LayerReport(layer=0, seconds=0.0, expert_size=4, n_tokens=8, rate_histogram={"max": 5.3, "bins": 4, "counts": [1, 2, 3, 4]},
                            shared_rate=3.0, routed_rate=1.0, load=[4, 4], statistic=statistic, router=router)  # fmt: skip
        return CarveReport(config=CarveConfig.from_string("S2A2E8", method=method), layers=[layer])

    assert statistic_title(report("fitted", "mean |h|", "shadow")) == "mean |h| of the FFN neurons (S2A2E8, fitted)"
    assert statistic_title(report("cmoe", "activation rate", "analytic")) == "activation rate of the FFN neurons (S2A2E8, cmoe, k_act=10)"
    # a report written before LayerReport named its statistic reads it from the method
    old = report("fitted", "mean |h|", "shadow").to_dict()
    for layer in old["layers"]:
        del layer["statistic"]
    assert statistic_title(CarveReport.from_dict(old)).startswith("mean |h|")
    assert plot_rate_histograms(report("fitted", "mean |h|", "shadow"), tmp_path / "r.png").read_bytes()[:8] == PNG
    assert plot_expert_load(report("fitted", "mean |h|", "shadow"), tmp_path / "l.png").read_bytes()[:8] == PNG


def test_compare_needs_two_models():
    assert main(["compare", "only-one-model", "--ppl", "wikitext2"]) == 2


@needs_reference
def test_inspect_plot_writes_pngs(tmp_path, carved_dir):
    assert main(["inspect", str(carved_dir), "--plot", "--plot-dir", str(tmp_path)]) == 0
    for kind in ("rates", "load"):
        assert (tmp_path / f"S2A6E8-{kind}.png").read_bytes()[:8] == PNG


FAKE_LLAMA_BENCH = """#!/usr/bin/env python3
import json, sys
args = sys.argv[1:]
open(sys.argv[0] + ".calls", "a").write(" ".join(args) + "\\n")
p, n = args[args.index("-p") + 1], args[args.index("-n") + 1]
if p != "0" and n != "0":  # prompt processing on repacked weights: dies without output, as on AMX
    sys.exit(134)
rows = []
if n != "0":
    rows.append({"n_prompt": 0, "n_gen": int(n), "avg_ts": 100.0})
if p != "0":
    rows.append({"n_prompt": int(p), "n_gen": 0, "avg_ts": 700.0 if "--repack" in args else 900.0})
print(json.dumps(rows))
"""


def test_llama_bench_falls_back_to_separate_runs_when_the_combined_one_dies(tmp_path):
    """A llama-bench that crashes on pp512 + tg128 together: tg128 runs alone with its default weights and
    pp512 alone with --repack 0, and later calls go straight to the two runs."""
    from moecarve.eval.bench import llama_bench

    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH)
    fake.chmod(0o755)
    run = llama_bench(fake, tmp_path / "m.gguf", threads=2)
    assert run() == {"tg128": 100.0, "pp512": 700.0}
    assert run() == {"tg128": 100.0, "pp512": 700.0}
    calls = (tmp_path / "llama-bench.calls").read_text().splitlines()
    assert len(calls) == 5  # the failed combined run once, then two runs per call
    assert sum("--repack 0" in c for c in calls) == 2 and all("-t 2" in c for c in calls)
