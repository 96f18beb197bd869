"""`moecarve frontier` end to end on a tiny model (every point measured, the frontier marked as
`pareto` marks it, the outputs written, --resume measuring only what is missing, bad inputs), and
the pieces of moecarve.eval.frontier that need no model."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
from dataclasses import fields

import pytest

from moecarve.cli import build_parser, main
from moecarve.config import CarveConfig
from moecarve.eval.frontier import METHODS, Candidate, Point, candidates, pareto

from tests.conftest import CALIB_TXT, TEST_TXT, tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


# --- the API pieces, no model ---------------------------------------------------------------------


def point(method: str, config: str, ppl: float, speed: float) -> Point:
    kind = "dense" if method == "dense" else "static" if CarveConfig.from_string(config).static else method
    return Point(method, config, kind, ppl, e2e_decode_b1=speed)


def test_pareto_marks_the_points_nothing_beats_on_both_axes():
    dense = point("dense", "dense", 5.0, 1.0)
    fast = point("default", "S1A1E8", 10.0, 1.5)
    slower_worse = point("cmoe", "S1A1E8", 12.0, 1.4)  # fast beats it on both
    slow = point("default", "S3A3E8", 8.0, 0.9)  # dense beats it on both
    tie = point("default", "S2A2E8", 10.0, 1.5)  # equal to fast on both: neither beats the other
    as_fast_worse = point("probe", "S2A2E8", 7.0, 1.0)  # as fast as dense, worse perplexity
    points = [dense, fast, slower_worse, slow, tie, as_fast_worse]
    assert pareto(points) == [fast, tie, dense]  # fastest first
    assert [p.on_frontier for p in points] == [True, True, False, False, True, False]
    assert pareto([dense]) == [dense] and dense.on_frontier


def test_candidates_run_static_configs_once_per_recipe_that_changes_them():
    got = candidates(["S2A0E8", "S1A1E8"], ["default", "topk", "probe", "cmoe"])
    assert [(c.method, c.config) for c in got] == [
        ("default", "S2A0E8"), ("cmoe", "S2A0E8"),  # the router flags do not change a static carve
        ("default", "S1A1E8"), ("topk", "S1A1E8"), ("probe", "S1A1E8"), ("cmoe", "S1A1E8"),
    ]  # fmt: skip
    assert candidates(["S1A1E8", "S1A1E8"], ["cmoe", "cmoe"]) == (Candidate("cmoe", "S1A1E8"),)
    assert [c.kind for c in got] == ["static", "static", "default", "topk", "probe", "cmoe"]


def test_candidate_commands_make_exactly_the_carve_measured():
    """Each printed command, parsed by the real CLI, gives the candidate's own CarveConfig."""
    model = "../shared/reference-lm"
    assert Candidate("default", "S1A1E8").command(model) == f"moecarve carve {model} --config S1A1E8 --out reference-lm-S1A1E8"
    assert Candidate("cmoe", "S2A0E8").command(model, out="o") == f"moecarve carve {model} --config S2A0E8 --method cmoe --out o"
    assert Candidate("topk", "S0A384E1536").command(model).endswith(
        "--config S0A384E1536 --selection topk --out reference-lm-S0A384E1536-topk")
    parser = build_parser()
    for method in METHODS:
        cand = Candidate(method, "S1A1E8")
        args = parser.parse_args(shlex.split(cand.command(model))[1:])
        cfg = CarveConfig.from_string(args.config, method=args.method, shadow_bits=args.shadow_bits, selection=args.selection,
                                      router=args.router, k_act=args.k_act, seed=args.seed)  # fmt: skip
        assert cfg == cand.carve_config(), method


def test_the_cli_knows_the_api_methods():
    from moecarve.cli.frontier import METHOD_NAMES

    assert METHOD_NAMES == tuple(METHODS)


# --- the command on a tiny model ------------------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) in-process with its stdout and stderr captured (stderr is not a terminal)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, reference_tokenizer):
    """A tiny llama with the reference tokenizer as a model folder, short calibration and test texts."""
    root = tmp_path_factory.mktemp("frontier")
    model = tiny_model("llama", vocab_size=len(reference_tokenizer))
    model.save_pretrained(root / "tiny")
    reference_tokenizer.save_pretrained(root / "tiny")
    (root / "calib.txt").write_text(CALIB_TXT.read_text()[:20_000])
    (root / "test.txt").write_text(TEST_TXT.read_text()[:4_000])  # 8+ windows of 64 tokens
    return root


def frontier_args(root, out, *extra) -> list[str]:
    return ["frontier", str(root / "tiny"), "--configs", "S2A0E4,S1A1E4", "--methods", "default,cmoe",
            "--ppl", str(root / "test.txt"), "--ppl-seqlen", "64", "--calib", str(root / "calib.txt"), "--samples", "2",
            "--seqlen", "64", "--speed-rounds", "3", "--threads", "1", "--out", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def sweep(inputs):
    """One sweep: S2A0E4 (static: default and cmoe rank neurons differently) and S1A1E4, each by
    default and cmoe; its folder, stdout and stderr."""
    out = inputs / "fr"
    code, stdout, stderr = run_cli(frontier_args(inputs, out))
    assert code == 0, stderr
    return out, stdout, stderr


def test_every_point_is_measured_and_the_frontier_is_pareto(sweep):
    out, stdout, stderr = sweep
    doc = json.loads((out / "frontier.json").read_text())
    points = doc["points"]
    assert [(p["method"], p["config"]) for p in points] == [
        ("dense", "dense"), ("default", "S2A0E4"), ("cmoe", "S2A0E4"), ("default", "S1A1E4"), ("cmoe", "S1A1E4")]
    assert all(set(p) == {f.name for f in fields(Point)} for p in points)
    assert [p["kind"] for p in points] == ["dense", "static", "static", "default", "cmoe"]
    for p in points[1:]:
        assert p["ppl"] > 0 and p["carve_seconds"] >= 0 and p["measured"]["ms"]
        assert all(p[s] > 0 for s in ("ffn_decode_b1", "e2e_decode_b1", "e2e_decode_b8"))
        assert p["command"].startswith(f"moecarve carve {out.parent / 'tiny'} --config {p['config']}")
        # tokens per second on the decode runtime, both models in the same run, as the ratio says
        assert p["tok_s_b1"] > 0 and p["dense_tok_s_b1"] > 0 and p["tok_s_b8"] > 0
        ms = p["measured"]["ms"]["e2e_decode_b1"]
        assert p["tok_s_b1"] == pytest.approx(1000 / ms["carved"], rel=1e-3)
        assert p["dense_tok_s_b1"] == pytest.approx(1000 / ms["dense"], rel=1e-3)
    # the dense point's tok/s: the median of its figure over the carves' runs
    dense_runs = sorted(p["dense_tok_s_b1"] for p in points[1:])
    assert points[0]["tok_s_b1"] == pytest.approx((dense_runs[1] + dense_runs[2]) / 2)
    assert (doc["meta"]["engine"], doc["meta"]["precision"]) == ("runtime", "bf16")
    # on_frontier: exactly the points no other point beats on both axes, as pareto marks them
    for p in points:
        beaten = any(q is not p and q["e2e_decode_b1"] >= p["e2e_decode_b1"] and q["ppl"] <= p["ppl"]
                     and (q["e2e_decode_b1"] > p["e2e_decode_b1"] or q["ppl"] < p["ppl"]) for q in points)  # fmt: skip
        assert p["on_frontier"] == (not beaten), p
    marked = [Point(**p) for p in points]
    pareto(marked)
    assert [p.on_frontier for p in marked] == [p["on_frontier"] for p in points]
    settings = doc["meta"]["settings"]
    assert (settings["ppl_seqlen"], settings["samples"], settings["dtype"], settings["threads"]) == (64, 2, "float32", 1)
    assert (out / "frontier.png").read_bytes()[:8] == PNG
    assert (out / "frontier.md").read_text().startswith("| method | config | perplexity |")
    # printed: the table, the frontier fastest first with the command of each carve, wall time, paths
    front = [p for p in points if p["on_frontier"]]
    assert f"Pareto frontier, {len(front)} of 5 points, fastest first:" in stdout
    listed = [line for line in stdout.splitlines() if line.startswith("  S") or "the dense model itself" in line]
    assert len(listed) == len(front)
    assert all(p["command"] in stdout for p in front if p["command"])
    assert "moecarve carve " in stdout and re.search(r"wall time \d+ s; wrote .*frontier\.json", stdout)
    # the progress bar prints as plain lines in a log, one per candidate as it finishes
    assert re.search(r"^frontier: 100%.*4/4", stderr, re.M) and "\r" not in stderr, stderr
    assert "Traceback" not in stderr and "FutureWarning" not in stderr


def test_resume_measures_only_the_missing_point(inputs, sweep, tmp_path, monkeypatch):
    import moecarve.eval.frontier as api

    out = tmp_path / "fr"
    shutil.copytree(sweep[0], out)
    doc = json.loads((out / "frontier.json").read_text())
    kept = [p for p in doc["points"] if (p["method"], p["config"]) != ("cmoe", "S1A1E4")]
    (out / "frontier.json").write_text(json.dumps({**doc, "points": kept}))
    carved = []
    real = api.carve
    monkeypatch.setattr(api, "carve", lambda model, cfg, *a, **kw: carved.append(cfg.name) or real(model, cfg, *a, **kw))
    argv = frontier_args(inputs, out)
    assert run_cli(argv)[0] == 2  # an existing --out needs --resume (or --overwrite)
    code, stdout, stderr = run_cli([*argv, "--resume"])
    assert code == 0, stderr
    assert carved == ["S1A1E4"]
    again = json.loads((out / "frontier.json").read_text())["points"]
    assert [(p["method"], p["config"]) for p in again] == [(p["method"], p["config"]) for p in doc["points"]]
    # the earlier points are kept as measured (their timings included), not measured again
    assert [p["measured"] for p in again if p["config"] != "S1A1E4" or p["method"] != "cmoe"] == [p["measured"] for p in kept]
    # another perplexity window would make the old points incomparable: refused, nothing touched
    before = (out / "frontier.json").read_bytes()
    code, _, stderr = run_cli([*argv[:-2], "--ppl-seqlen", "128", "--out", str(out), "--resume"])
    assert code == 2 and "was measured with --ppl-seqlen 64, not 128" in stderr
    assert (out / "frontier.json").read_bytes() == before


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--methods", "default,fastest"], "unknown method 'fastest'; choose among default, topk, probe, cmoe"),
        (["--configs", "S2A2E7"], "7 experts do not divide the intermediate size 128"),
        (["--ppl", "no-such.txt"], "is neither wikitext2 nor c4 nor an existing file"),
        (["--out", "EXISTING"], "already exists; pass --resume to continue its sweep or --overwrite to start over"),
        (["--ppl-chars", "600"], "timing decode at batch 8 needs 8 of at least 64"),  # found once the text is tokenized
        (["--llama-bench", "llama-bench"], "--llama-bench and --gguf go together"),
        (["--engine", "runtime", "--device", "cuda"], "the decode runtime runs on CPU"),
    ],
)
def test_bad_inputs_fail_with_one_line_before_any_work(inputs, tmp_path, extra, message):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    extra = [str(existing) if e == "EXISTING" else e for e in extra]
    code, stdout, stderr = run_cli([*frontier_args(inputs, tmp_path / "out"), *extra])
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]
    assert code == 2 and "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert not (tmp_path / "out").exists() and [p.name for p in existing.iterdir()] == ["keep.txt"]
