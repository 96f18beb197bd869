"""`moecarve chat MODEL`: an interactive chat through the decode runtime.

The model's chat template formats the history (a plain "User:/Assistant:" format where it has
none, said once); /reset clears the history, /exit (or end of input) quits; Ctrl-C stops the
answer being written, not the session. When the history outgrows the context, the oldest turns
are dropped, and the user is told.
"""

from __future__ import annotations

import sys

from .common import add_command, at_least
from .generate import add_runtime_args, add_sampling_args, load, sampling

COMMANDS_HELP = "/reset clears the history, /exit quits, Ctrl-C stops an answer"


def register(sub) -> None:
    p = add_command(
        sub, "chat",
        help="chat with a model interactively through the decode runtime",
        description="An interactive chat with a dense model or a carved folder through moecarve's native decode "
        f"runtime, in the model's chat template ({COMMANDS_HELP}). Reads one message per line; answers stream to "
        "stdout, notes go to stderr.",
    )  # fmt: skip
    add_runtime_args(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message that opens the conversation")
    p.add_argument("--max-new-tokens", type=at_least(1), default=512, metavar="N",
                   help="tokens per answer at most (fewer where the context ends first)")  # fmt: skip
    add_sampling_args(p)
    p.set_defaults(func=run)


def note(text: str) -> None:
    print(f"({text})", file=sys.stderr, flush=True)


def run(args) -> int:
    from ..serve import prompt as chat_prompt

    params = sampling(args)
    loaded = load(args)
    rt, tok = loaded.runtime, loaded.tokenizer
    if not chat_prompt.has_template(tok):
        print(f"note: {chat_prompt.FALLBACK_NOTE}", file=sys.stderr)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    note(f"chatting with {args.model}, a context of {rt.max_ctx} tokens: {COMMANDS_HELP}")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    # room kept for the answer when the history is trimmed to the context
    reserve = min(args.max_new_tokens, rt.max_ctx // 2)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            note("/exit quits")
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = list(system)
            note("history cleared")
            continue
        if command.startswith("/") and " " not in command:
            note(f"unknown command {command}: {COMMANDS_HELP}")
            continue
        try:
            ids, history, dropped = chat_prompt.fit(tok, history + [{"role": "user", "content": line}], rt.max_ctx - reserve)
        except chat_prompt.PromptError as e:
            note(f"not sent: {e}")
            continue
        if dropped:
            note(f"dropped the {dropped} oldest message{'s' * (dropped > 1)}: the history outgrew the context of "
                 f"{rt.max_ctx} tokens")  # fmt: skip
        answer = reply(loaded, ids, min(args.max_new_tokens, rt.max_ctx - len(ids)), params,
                       chat_prompt.stop_strings(tok))  # fmt: skip
        history.append({"role": "assistant", "content": answer})
    return 0


def reply(loaded, ids: list[int], max_new: int, params, stop) -> str:
    """Stream one answer to stdout; returns its text (what was shown, if Ctrl-C stopped it)."""
    from ..runtime import Engine, TextStream

    # a fresh engine per answer: a step interrupted by Ctrl-C leaves no state behind
    engine = Engine(loaded.runtime, loaded.eos_ids)
    req = engine.submit(ids, max_new, params)
    stream = TextStream(loaded.tokenizer, stop)
    parts: list[str] = []

    def show(delta: str) -> None:
        if not "".join(parts):  # the answer starts at its first visible character
            delta = delta.lstrip()
        parts.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()

    seen = 0
    try:
        while not req.done.is_set() and not stream.finished:
            engine.step()
            for token in req.output[seen:]:
                show(stream.push(token))
            seen = len(req.output)
        show(stream.flush())
        sys.stdout.write("\n")
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        note("stopped")
    sys.stdout.flush()
    return "".join(parts).strip()
