"""The OpenAI wire format: request bodies validated into GenerationRequest, responses, stream
chunks and errors shaped as the OpenAI API shapes them.

Status codes: 400 for a body that is not a JSON object or values that cannot be served (an empty
prompt, max_tokens <= 0, more tokens than the context holds, an option this server does not
implement), 422 for a JSON object that does not match the schema (a required field missing, a
field of the wrong type), 404 for an unknown model or path, 413 for a body over the size limit.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ..runtime.sample import SamplingError, SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 16  # OpenAI allows 4; more only costs a little per token
# options this server does not implement, with the values that ask for nothing (accepted)
_UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
                "best_of": (None, 1), "tools": (None, []), "functions": (None, [])}


class ApiError(Exception):
    """An error the client caused (or a server failure), sent as {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """What /v1/completions and /v1/chat/completions ask for, validated."""

    model: str | None
    prompt: str | list[int] | None = None  # completions: text or token ids
    messages: list[dict] | None = None  # chat: [{"role", "content": str}]
    max_tokens: int | None = None  # None: the endpoint's default
    stop: list[str] = field(default_factory=list)
    sampling: SamplingParams = SamplingParams()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    return body


def _get(body: dict, name: str, kinds: tuple[type, ...], what: str, default=None, required: bool = False):
    """body[name] if it is one of `kinds` (bool is never a number here), else a 422."""
    if name not in body or body[name] is None:
        if required:
            raise ApiError(422, f"'{name}' is required", "missing_field", name)
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(422, f"'{name}' must be {what} (got {json.dumps(value)[:80]})", "invalid_type", name)
    return value


def _common(body: dict) -> dict:
    """The fields both endpoints share."""
    n = _get(body, "n", (int,), "an integer", 1)
    if n != 1:
        raise ApiError(400, "'n' must be 1: this server returns one choice per request", "unsupported", "n")
    for name, harmless in _UNSUPPORTED.items():
        if body.get(name) not in harmless:
            raise ApiError(400, f"'{name}' is not supported by this server", "unsupported", name)
    max_tokens = _get(body, "max_tokens", (int,), "an integer")
    if max_tokens is None:
        max_tokens = _get(body, "max_completion_tokens", (int,), "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'max_tokens' must be at least 1 (got {max_tokens})", "invalid_value", "max_tokens")
    stop = _get(body, "stop", (str, list), "a string or a list of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise ApiError(422, "'stop' must be a string or a list of strings", "invalid_type", "stop")
    if len(stop) > MAX_STOPS:
        raise ApiError(400, f"'stop' holds {len(stop)} strings; at most {MAX_STOPS}", "invalid_value", "stop")
    temperature = _get(body, "temperature", (int, float), "a number", 1.0)  # OpenAI's default: sampling
    top_p = _get(body, "top_p", (int, float), "a number", 1.0)
    top_k = _get(body, "top_k", (int,), "an integer", 0)  # an extension (vLLM, llama.cpp have it too)
    seed = _get(body, "seed", (int,), "an integer")
    try:
        sampling = SamplingParams(float(temperature), top_k, float(top_p), seed)
    except SamplingError as e:
        raise ApiError(400, str(e), "invalid_value") from None
    stream = _get(body, "stream", (bool,), "true or false", False)
    options = _get(body, "stream_options", (dict,), "an object", {})
    include_usage = _get(options, "include_usage", (bool,), "true or false", False)
    model = _get(body, "model", (str,), "a string")
    return dict(model=model, max_tokens=max_tokens, stop=[s for s in stop if s], sampling=sampling, stream=stream,
                include_usage=include_usage)  # fmt: skip


def parse_completion(body: dict) -> GenerationRequest:
    """A /v1/completions body: `prompt` is a string, a list of one string, or a list of token ids."""
    prompt = _get(body, "prompt", (str, list), "a string or a list of token ids", required=True)
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif prompt and all(isinstance(p, str) for p in prompt):
            raise ApiError(400, "one prompt per request: this server does not batch prompts in one request",
                           "unsupported", "prompt")  # fmt: skip
        elif not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ApiError(422, "'prompt' must be a string or a list of token ids", "invalid_type", "prompt")
    if not prompt:
        raise ApiError(400, "'prompt' is empty", "invalid_value", "prompt")
    return GenerationRequest(prompt=prompt, **_common(body))


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or the text of its content parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", "unsupported", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(422, f"messages[{i}].content must be a string or a list of text parts", "invalid_type", "messages")


def parse_chat(body: dict) -> GenerationRequest:
    """A /v1/chat/completions body: `messages` a non-empty list of {"role", "content"}."""
    messages = _get(body, "messages", (list,), "a list of messages", required=True)
    if not messages:
        raise ApiError(400, "'messages' is empty", "invalid_value", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(422, f"messages[{i}] must be an object with 'role' and 'content'", "invalid_type", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(422 if not isinstance(role, str) else 400,
                           f"messages[{i}].role must be one of {', '.join(ROLES)} (got {json.dumps(role)})",
                           "invalid_value", "messages")  # fmt: skip
        clean.append({"role": role, "content": _content(m, i)})
    return GenerationRequest(messages=clean, **_common(body))


# ---------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


class Shape:
    """The OpenAI objects of one answer: a text completion's or a chat completion's, whole or as
    stream chunks, all with one id and creation time."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()

    def _wrap(self, obj: str, choices: list[dict], use: dict | None = None) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if use is not None:
            out["usage"] = use
        return out

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def opening(self) -> list[dict]:
        """The chunks before the text: a chat stream names the speaker first."""
        return [self.chunk("", None, {"role": "assistant", "content": ""})] if self.chat else []

    def chunk(self, text: str, finish_reason: str | None, delta: dict | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta if delta is not None else ({"content": text} if text else {})}
        else:
            choice = {"index": 0, "text": text}
        return self._wrap(self.chunk_object, [{**choice, "logprobs": None, "finish_reason": finish_reason}])

    def usage_chunk(self, use: dict) -> dict:
        """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
        return self._wrap(self.chunk_object, [], use)

    def response(self, text: str, finish_reason: str | None, use: dict) -> dict:
        """The whole answer (stream: false)."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish_reason)
        return self._wrap("chat.completion" if self.chat else "text_completion", [choice], use)


def event(obj: dict) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
