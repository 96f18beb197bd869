"""`moecarve generate` and `moecarve chat` on the reference model: the text they print is the
runtime's own greedy decode (streamed, not printed at the end), the summary on stderr, stdin,
chat formats, history and its trimming, Ctrl-C, and bad input -> one line, exit 2."""

from __future__ import annotations

import io
import re

import pytest

from moecarve.cli import main
from tests.conftest import REFERENCE_LM

pytestmark = pytest.mark.skipif(not REFERENCE_LM.exists(), reason="needs ../shared/reference-lm")

REF = str(REFERENCE_LM)
RUN = ["--threads", "1", "--max-ctx", "256"]
PROMPT = "The kernel module"


@pytest.fixture(scope="module")
def ref():
    from moecarve.runtime import load_runtime

    return load_runtime(REF, precision="bf16", threads=1, max_ctx=256)


def greedy(ref, text: str, n: int, special: bool = True) -> str:
    """The runtime's greedy continuation of `text` (n tokens or to EOS), decoded."""
    from moecarve.runtime import generate

    ids = ref.tokenizer(text, add_special_tokens=special)["input_ids"]
    return ref.tokenizer.decode(list(generate(ref.runtime, ids, n, stop_ids=ref.eos_ids)), skip_special_tokens=True)


class Writes(io.StringIO):
    """stdout that remembers how many pieces it was written in."""

    def __init__(self):
        super().__init__()
        self.pieces = 0

    def write(self, s: str) -> int:
        self.pieces += bool(s)
        return super().write(s)


def test_generate_streams_the_greedy_text(ref, monkeypatch, capsys):
    out = Writes()
    monkeypatch.setattr("sys.stdout", out)
    assert main(["generate", REF, "--prompt", PROMPT, "--max-new-tokens", "24", *RUN]) == 0
    assert out.getvalue() == greedy(ref, PROMPT, 24) + "\n"
    assert out.pieces > 10, "the text should be written as it is produced, not at the end"
    last = capsys.readouterr().err.strip().splitlines()[-1]
    n_prompt = len(ref.tokenizer(PROMPT)["input_ids"])
    assert re.fullmatch(rf"prompt {n_prompt} tokens, generated 24 \(length\), time to first token \d+\.\d+ s, "
                        r"\d+\.\d tok/s", last), last  # fmt: skip


def test_generate_reads_the_prompt_from_stdin(ref, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    assert main(["generate", REF, "--prompt", "-", "--max-new-tokens", "8", *RUN]) == 0
    assert capsys.readouterr().out == greedy(ref, PROMPT, 8) + "\n"


def test_generate_sampling_is_seeded_and_the_context_bounds_the_answer(capsys):
    argv = ["generate", REF, "--prompt", PROMPT, "--temperature", "1.2", "--top-k", "50", "--seed", "5", *RUN]
    assert main([*argv, "--max-new-tokens", "12"]) == 0
    first = capsys.readouterr().out
    assert main([*argv, "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == first
    # more new tokens than the context leaves: clipped, and said
    assert main(["generate", REF, "--prompt", PROMPT, "--max-new-tokens", "500", "--threads", "1", "--max-ctx", "16"]) == 0
    err = capsys.readouterr().err
    assert "note: 13 new tokens at most: the context holds 16 tokens" in err and "generated 13 (length)" in err


@pytest.mark.parametrize("argv,stdin,message", [
    (["generate", "no-such-model", "--prompt", "x"], None, "does not exist"),
    (["generate", REF, "--prompt", ""], None, "the prompt is empty"),
    (["generate", REF, "--prompt", "-"], "", "the prompt is empty (nothing on stdin)"),
    (["generate", REF, "--prompt", "word " * 40, "--max-ctx", "16"], None, "tokens; the context holds 16 (raise --max-ctx"),
    (["generate", REF, "--prompt", "x", "--max-new-tokens", "0"], None, "--max-new-tokens: must be >= 1"),
    (["generate", REF, "--prompt", "x", "--temperature", "-1"], None, "--temperature: must be in [0, inf)"),
    (["generate", REF, "--prompt", "x", "--top-p", "0"], None, "--top-p: must be in (0, 1], got 0"),
    (["generate", REF, "--prompt", "x", "--precision", "fp16"], None, "invalid choice: 'fp16'"),
    (["generate", REF], None, "the following arguments are required: --prompt"),
    (["chat", "no-such-model"], None, "does not exist"),
    (["chat", REF, "--threads", "0"], None, "--threads: must be >= 1"),
    (["serve", REF, "--port", "70000"], None, "--port: must be in 1..65535"),
    (["serve", "no-such-model"], None, "does not exist"),
])  # fmt: skip
def test_bad_input_one_line_exit_2(argv, stdin, message, monkeypatch, capsys):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_precision_choices_are_the_runtimes():
    from moecarve.cli.generate import PRECISIONS
    from moecarve.runtime.pack import PRECISIONS as RUNTIME

    assert set(PRECISIONS) == set(RUNTIME)


# ---------------------------------------------------------------------- chat
def chat(monkeypatch, capsys, model: str, lines: list[str], *extra: str) -> tuple[str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    assert main(["chat", model, *RUN, "--max-new-tokens", "12", *extra]) == 0
    return capsys.readouterr()


def fallback_answer(ref, prompt: str) -> str:
    """What the plain User:/Assistant: format answers: up to the model's next "User:" line."""
    text = greedy(ref, prompt, 12)
    return text.split("\nUser:")[0].strip()


def test_chat_without_a_template_commands_and_history(ref, monkeypatch, capsys):
    out, err = chat(monkeypatch, capsys, REF, ["Hello there", "What is a driver?", "/reset", "/bogus", "What is a driver?",
                                               "/exit", "never read"])  # fmt: skip
    assert "note: this model has no chat template: using a plain 'User:/Assistant:' format" in err
    assert "(history cleared)" in err and "(unknown command /bogus" in err
    a1 = fallback_answer(ref, "User: Hello there\nAssistant:")
    a2 = fallback_answer(ref, f"User: Hello there\nAssistant: {a1}\nUser: What is a driver?\nAssistant:")  # with history
    a3 = fallback_answer(ref, "User: What is a driver?\nAssistant:")  # after /reset
    assert out == f"{a1}\n{a2}\n{a3}\n"
    assert a2 != a3, "the history should change the second answer"


def test_chat_uses_the_models_template(ref, tmp_path, monkeypatch, capsys):
    for f in REFERENCE_LM.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>")
    out, err = chat(monkeypatch, capsys, str(tmp_path), ["Hi", "And then?"], "--system", "Be brief.")
    assert "no chat template" not in err
    a1 = greedy(ref, "<system>Be brief.\n<user>Hi\n<assistant>", 12, special=False).strip()
    a2 = greedy(ref, f"<system>Be brief.\n<user>Hi\n<assistant>{a1}\n<user>And then?\n<assistant>", 12, special=False).strip()
    assert out == f"{a1}\n{a2}\n"


def test_chat_drops_the_oldest_turns_when_the_history_outgrows_the_context(monkeypatch, capsys):
    long = "Tell me about the memory management of the kernel and its drivers"  # ~12 tokens
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{long}\n" * 4))
    assert main(["chat", REF, "--threads", "1", "--max-ctx", "64", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert "oldest message" in err and "the history outgrew the context of 64 tokens" in err
    assert len(out.splitlines()) >= 4  # every message was answered


def test_ctrl_c_stops_the_answer_not_the_session(ref, monkeypatch, capsys):
    from moecarve.runtime import Engine

    real, calls = Engine.step, [0]

    def step(self):
        calls[0] += 1
        if calls[0] == 4:  # the first answer, a few tokens in
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Engine, "step", step)
    out, err = chat(monkeypatch, capsys, REF, ["Hello there", "What is a driver?"])
    assert "(stopped)" in err
    first, second = out.split("\n", 1)
    a1 = fallback_answer(ref, "User: Hello there\nAssistant:")
    assert a1.startswith(first.strip()) and len(first.strip()) < len(a1)  # cut short
    assert second.strip(), "the session should go on to answer the next message"
