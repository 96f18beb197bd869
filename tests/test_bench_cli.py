"""`moecarve bench` on the reference model and a carve of it: every case gets its figures, the JSON
rows say what each is, the carve reads fewer bytes per token than dense, and each runtime row's
time is broken down by phase."""

from __future__ import annotations

import json

import pytest
import torch

import moecarve
from moecarve.cli import main
from moecarve.runtime.native import PHASES
from tests.conftest import REFERENCE_LM

pytestmark = pytest.mark.skipif(not REFERENCE_LM.exists(), reason="needs ../shared/reference-lm")


@pytest.fixture(scope="module")
def carved(tmp_path_factory, reference_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(REFERENCE_LM, dtype=torch.float32)
    windows = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    report = moecarve.carve(model, moecarve.CarveConfig.from_string("S0A384E1536"), windows, device="cpu", progress=False)
    out = tmp_path_factory.mktemp("bench") / "carved"
    moecarve.save(model, out, tokenizer=reference_tokenizer, report=report)
    return out


def test_bench_times_every_case_and_says_where_the_time_goes(carved, tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["bench", str(REFERENCE_LM), "--carve", str(carved), "--precision", "bf16,fp32", "--threads", "1",
            "--batch", "1,2", "--rounds", "1", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    cases = {(r["model"], r["carve"], r["precision"], r["batch"], r["test"]) for r in rows}
    for model, label in ((REFERENCE_LM.name, "dense"), ("carved", "S0A384E1536")):
        for prec in ("bf16", "fp32"):
            assert {(model, label, prec, 1, "pp512"), (model, label, prec, 1, "tg128"), (model, label, prec, 2, "tg128")} <= cases
    assert len(rows) == len(cases) == 12  # no pp512 at batch 2
    for r in rows:
        assert r["engine"] == "moecarve" and r["threads"] == 1 and r["tok_s"] > 0
        if r["test"] == "tg128":
            assert set(r["phases"]) == {*PHASES, "overhead"} and min(r["phases"].values()) >= 0
            assert r["phases"]["ffn"] > 0 and r["phases"]["lm_head"] > 0
            assert (r["phases"]["router"] > 0) == (r["carve"] != "dense")  # 2 sequences are routed (below dense_batch)
    by = {(r["carve"], r["precision"]): r["bytes_per_token"] for r in rows if r["test"] == "tg128" and r["batch"] == 1}
    for prec in ("bf16", "fp32"):
        assert by[("S0A384E1536", prec)] < by[("dense", prec)]
    assert by[("dense", "bf16")] < by[("dense", "fp32")]
    printed = capsys.readouterr().out
    assert "where a decode step's time goes" in printed and "tokens/s (pp512, tg128)" in printed
