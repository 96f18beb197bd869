"""Chat messages -> prompt token ids: the tokenizer's chat template, or a plain "User:/Assistant:"
format for a model without one, with the oldest turns dropped when the history outgrows the
context. Shared by `moecarve chat` and the server's /v1/chat/completions.
"""

from __future__ import annotations

from ..errors import MoecarveError

FALLBACK_NOTE = "this model has no chat template: using a plain 'User:/Assistant:' format"
# the fallback format has no end-of-turn token: a model that goes on to write the user's next
# line is stopped there
FALLBACK_STOP = ("\nUser:",)
_FALLBACK_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


class PromptError(MoecarveError, ValueError):
    """Messages that cannot become a prompt (a template that refuses them, one that cannot fit)."""


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def stop_strings(tokenizer) -> tuple[str, ...]:
    """Stop strings the chat format itself needs (the model's own template ends turns with a token)."""
    return () if has_template(tokenizer) else FALLBACK_STOP


def render(tokenizer, messages: list[dict]) -> str:
    """The prompt text of `messages` ({"role", "content": str}), ready for the assistant's answer."""
    if has_template(tokenizer):
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja's errors (a template that wants alternating roles, raise_exception(...))
            raise PromptError(f"the model's chat template refused these messages: {e}") from e
    lines = [f"{_FALLBACK_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def encode(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt token ids of `messages`. A template writes its own special tokens (BOS included), so
    they are not added twice; the fallback gets the tokenizer's usual ones."""
    text = render(tokenizer, messages)
    return list(tokenizer(text, add_special_tokens=not has_template(tokenizer))["input_ids"])


def fit(tokenizer, messages: list[dict], budget: int) -> tuple[list[int], list[dict], int]:
    """(prompt ids, the messages kept, how many were dropped): the oldest messages after the
    leading system ones are dropped, a turn at a time, until the prompt has at most `budget`
    tokens. PromptError when even the last message (with the system ones) does not fit."""
    head = 0
    while head < len(messages) and messages[head]["role"] in ("system", "developer"):
        head += 1
    system, turns = messages[:head], messages[head:]
    dropped = 0
    while True:
        kept = system + turns[dropped:]
        ids = encode(tokenizer, kept)
        if len(ids) <= budget:
            return ids, kept, dropped
        if dropped >= len(turns) - 1:
            raise PromptError(f"the message needs {len(ids)} prompt tokens; at most {budget} fit in the context "
                              "beside the answer")  # fmt: skip
        dropped += 1
        # drop whole turns: a history should not start with an assistant's answer
        while dropped < len(turns) - 1 and turns[dropped]["role"] != "user":
            dropped += 1
