"""The OpenAI-compatible server (moecarve.serve) against a live uvicorn on the reference model,
through the official `openai` client: both endpoints plain and streaming, concurrent clients
batched and still exact, every bad request answered in OpenAI's shape while the server keeps
serving, disconnects that free their slot, and the `moecarve serve` command."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import REFERENCE_LM, ROOT

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.skipif(not REFERENCE_LM.exists(), reason="needs ../shared/reference-lm")

CTX = 512
BATCH = 8
MAX_BODY = 64 * 1024
PROMPTS = ["Once upon a time", "The kernel module", "int main(void) {", "In 1905, Einstein", "The quick brown fox",
           "static int foo", "Dear Sir,", "def f(x):"]  # fmt: skip
N_NEW = 32
FALLBACK_CHAT = "User: Hello there\nAssistant:"  # the plain format of [{"role": "user", "content": "Hello there"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """A running server and what the tests compare it with."""

    def __init__(self, base: str, service, tokenizer, expected: dict[str, list[int]]):
        self.base = base
        self.service = service
        self.tok = tokenizer
        self.expected = expected  # greedy token ids of each prompt, decoded alone before the server started
        self.client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        self.http = httpx.Client(base_url=base, timeout=120)

    def text(self, key: str, n: int = N_NEW) -> str:
        return self.tok.decode(self.expected[key][:n], skip_special_tokens=True)

    def health(self) -> dict:
        return self.http.get("/health").json()


@contextlib.contextmanager
def running(app):
    """uvicorn serving `app` in a thread on a free port; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def live():
    from moecarve.runtime import generate, load_runtime
    from moecarve.serve.app import create_app

    loaded = load_runtime(str(REFERENCE_LM), precision="bf16", threads=2, max_ctx=CTX, max_slots=BATCH)
    tok = loaded.tokenizer
    expected = {}
    for p in [*PROMPTS, FALLBACK_CHAT]:  # alone, on the runtime itself, before the engine thread runs
        expected[p] = list(generate(loaded.runtime, tok(p)["input_ids"], N_NEW, stop_ids=loaded.eos_ids))
    app = create_app(loaded, max_body=MAX_BODY)
    with running(app) as base:
        yield Live(base, app.state.service, tok, expected)


def wait_idle(live: Live, timeout: float = 10.0, cancelled: int | None = None) -> dict:
    """/health once no sequence runs or waits, and (if given) the cancel count has reached `cancelled`
    (or the last one seen after `timeout`). The count matters: a request the server has not handed to
    the engine yet also leaves it idle."""
    deadline = time.time() + timeout
    while True:
        h = live.health()
        counted = cancelled is None or h["cancelled"] >= cancelled
        if (h["running"] == 0 and h["waiting"] == 0 and counted) or time.time() > deadline:
            return h
        time.sleep(0.05)


def sse_lines(response) -> list[str]:
    return [line for line in response.iter_lines() if line]


# ---------------------------------------------------------------------- the endpoints
def test_health_and_models(live):
    h = live.health()
    assert h["status"] == "ok" and h["slots"] == BATCH and h["free_slots"] == BATCH and h["max_ctx"] == CTX
    ids = [m.id for m in live.client.models.list().data]
    assert ids == ["reference-lm"]
    assert live.client.models.retrieve("reference-lm").id == "reference-lm"


def test_completion_is_the_greedy_decode(live):
    prompt = PROMPTS[0]
    r = live.client.completions.create(model="reference-lm", prompt=prompt, max_tokens=N_NEW, temperature=0)
    assert r.choices[0].text == live.text(prompt)
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion" and r.model == "reference-lm"
    n_prompt = len(live.tok(prompt)["input_ids"])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, N_NEW, n_prompt + N_NEW)
    # token ids as the prompt, and the model named by its path (an alias)
    r2 = live.client.completions.create(model=str(REFERENCE_LM), prompt=live.tok(prompt)["input_ids"], max_tokens=8,
                                        temperature=0)  # fmt: skip
    assert r2.choices[0].text == live.text(prompt, 8)


def test_completion_stream(live):
    prompt = PROMPTS[1]
    chunks = list(live.client.completions.create(model="reference-lm", prompt=prompt, max_tokens=N_NEW, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > N_NEW // 2, "the text should arrive in pieces, as it is produced"
    assert "".join(c.choices[0].text for c in text_chunks) == live.text(prompt)
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert chunks[-1].usage.completion_tokens == N_NEW and not chunks[-1].choices
    # on the wire: server-sent events ending with [DONE]
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}
    with live.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = sse_lines(r)
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]) == live.text(prompt, 4)


def test_chat_without_a_template_uses_the_plain_format(live):
    messages = [{"role": "user", "content": "Hello there"}]
    r = live.client.chat.completions.create(model="reference-lm", messages=messages, max_tokens=N_NEW, temperature=0)
    text = live.text(FALLBACK_CHAT)
    want = text[: text.index("\nUser:")] if "\nUser:" in text else text  # the format's stop string
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(live.tok(FALLBACK_CHAT)["input_ids"])
    stream = list(live.client.chat.completions.create(model="reference-lm", messages=messages, max_tokens=N_NEW,
                                                      temperature=0, stream=True))  # fmt: skip
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    assert stream[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_uses_the_tokenizers_template(live):
    tok = live.tok
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a driver?"}]
    rendered = "[system] Be brief.\n[user] What is a driver?\n[assistant]"
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    want = live.client.completions.create(model="reference-lm", prompt=ids, max_tokens=12, temperature=0)
    tok.chat_template = template
    try:
        r = live.client.chat.completions.create(model="reference-lm", messages=messages, max_tokens=12, temperature=0)
    finally:
        tok.chat_template = None
    assert r.choices[0].message.content == want.choices[0].text
    assert r.usage.prompt_tokens == len(ids)


def test_stop_strings_and_eos(live):
    prompt = PROMPTS[0]
    full = live.text(prompt)
    word = full.split()[3]
    cut = full.index(word)
    r = live.client.completions.create(model="reference-lm", prompt=prompt, max_tokens=N_NEW, temperature=0,
                                       stop=["@@never@@", word])  # fmt: skip
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    stream = list(live.client.completions.create(model="reference-lm", prompt=prompt, max_tokens=N_NEW, temperature=0,
                                                 stop=word, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in stream) == full[:cut] and stream[-1].choices[0].finish_reason == "stop"
    assert wait_idle(live)["free_slots"] == BATCH  # a stop string frees the slot before max_tokens


def test_sampling_is_seeded(live):
    kw = dict(model="reference-lm", prompt=PROMPTS[2], max_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    a = live.client.completions.create(**kw).choices[0].text
    b = live.client.completions.create(**kw).choices[0].text
    c = live.client.completions.create(**kw, extra_body={"top_k": 1}).choices[0].text  # top_k 1 is greedy
    assert a == b and c == live.text(PROMPTS[2], 16)


def test_eight_concurrent_clients_get_what_each_gets_alone(live):
    peak = [0]
    watching = threading.Event()

    def watch():  # how many sequences the engine decodes together
        while not watching.is_set():
            peak[0] = max(peak[0], len(live.service.engine.running))
            time.sleep(0.002)

    def ask(prompt: str) -> str:
        stream = live.client.completions.create(model="reference-lm", prompt=prompt, max_tokens=N_NEW, temperature=0,
                                                stream=True)  # fmt: skip
        return "".join(c.choices[0].text for c in stream)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(BATCH) as pool:
            got = list(pool.map(ask, PROMPTS))
    finally:
        watching.set()
        watcher.join()
    assert got == [live.text(p) for p in PROMPTS]
    assert peak[0] >= 4, f"the requests were not decoded together (at most {peak[0]} at once)"
    assert wait_idle(live)["free_slots"] == BATCH


# ---------------------------------------------------------------------- bad requests
LONG = "word " * 2000  # more tokens than the context
BAD = [
    # name, path, raw body (bytes) or JSON, status, code
    ("malformed json", "/v1/completions", b'{"prompt": "x",', 400, "invalid_json"),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
    ("missing prompt", "/v1/completions", {"max_tokens": 4}, 422, "missing_field"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "invalid_value"),
    ("empty token prompt", "/v1/completions", {"prompt": []}, 400, "invalid_value"),
    ("missing messages", "/v1/chat/completions", {"model": "reference-lm"}, 422, "missing_field"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "invalid_value"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value"),
    ("max_tokens 0", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "invalid_value"),
    ("max_tokens negative", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -3},
     400, "invalid_value"),
    ("max_tokens a string", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 422, "invalid_type"),
    ("max_tokens past the context", "/v1/completions", {"prompt": "x", "max_tokens": CTX}, 400, "context_length_exceeded"),
    ("prompt past the context", "/v1/completions", {"prompt": LONG, "max_tokens": 1}, 400, "context_length_exceeded"),
    ("chat past the context", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400,
     "context_length_exceeded"),
    ("token id outside the vocabulary", "/v1/completions", {"prompt": [1, 10**9]}, 400, "invalid_value"),
    ("negative temperature", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, "invalid_value"),
    ("n > 1", "/v1/completions", {"prompt": "x", "n": 2}, 400, "unsupported"),
    ("unknown model", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model_not_found"),
    ("unknown model, chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope"},
     404, "model_not_found"),
    ("body over the limit", "/v1/completions", {"prompt": "x" * (MAX_BODY + 1)}, 413, "request_too_large"),
    ("unknown endpoint", "/v1/embeddings", {"input": "x"}, 404, "not_found"),
]  # fmt: skip


@pytest.mark.parametrize("path,body,status,code", [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_requests_get_openai_errors(live, path, body, status, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = live.http.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"], err
    assert "Traceback" not in r.text and "\n" not in err["message"]
    # and the server goes on serving
    ok = live.http.post("/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == live.text(PROMPTS[3], 4)


def test_the_openai_client_raises_its_own_errors(live):
    with pytest.raises(openai.NotFoundError) as e:
        live.client.completions.create(model="gpt-4", prompt="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="context"):
        live.client.chat.completions.create(model="reference-lm", messages=[{"role": "user", "content": LONG}])
    with pytest.raises(openai.BadRequestError):
        live.client.completions.create(model="reference-lm", prompt="x", max_tokens=0)


@pytest.fixture
def slow_steps(live, monkeypatch):
    """Every engine step takes at least 10 ms while the test runs: a whole answer then takes seconds,
    so the generation cannot end on its own before the server sees the client leave (on a fast
    machine the reference model writes its 496 tokens in well under a second)."""
    rt = live.service.engine.rt
    step = rt.step

    def slow(*args, **kwargs):
        time.sleep(0.01)
        return step(*args, **kwargs)

    monkeypatch.setattr(rt, "step", slow)


def test_a_disconnect_cancels_the_generation_and_frees_the_slot(live, slow_steps):
    before = live.health()["cancelled"]
    body = {"prompt": PROMPTS[4], "max_tokens": CTX - 16, "temperature": 0, "stream": True}
    with live.http.stream("POST", "/v1/completions", json=body) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got == 3:
                break  # leaving the block closes the connection mid-stream
    h = wait_idle(live, cancelled=before + 1)
    assert h["running"] == 0 and h["free_slots"] == BATCH and h["cancelled"] == before + 1, h
    # a client that gives up on a whole answer: the same. A raw socket, closed once the engine runs
    # the request (a client timing out before the server read its body leaves no job to cancel)
    payload = json.dumps({**body, "stream": False}).encode()
    host, port = live.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(payload), payload))  # fmt: skip
        deadline = time.time() + 10
        while live.health()["running"] == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert live.health()["running"] == 1
    h = wait_idle(live, cancelled=before + 2)
    assert h["running"] == 0 and h["free_slots"] == BATCH and h["cancelled"] == before + 2, h
    r = live.client.completions.create(model="reference-lm", prompt=PROMPTS[5], max_tokens=N_NEW, temperature=0)
    assert r.choices[0].text == live.text(PROMPTS[5])


def test_a_cancel_that_arrives_as_a_token_does_is_not_lost():
    """The race behind a whole answer that ran on after its client left: the job's reader was
    cancelled just as the engine woke it with a token; `asyncio.wait_for` (Python < 3.12) then
    returned the wake-up and dropped the cancel. Here the wake-up is always first in line."""
    import asyncio

    from moecarve.serve.app import _wait

    async def scene() -> tuple[bool, int]:
        wake, rounds = asyncio.Event(), [0]

        async def reader() -> None:  # Job.deltas's loop: wait for a token, read it, wait again
            while True:
                await _wait(wake, 5.0)
                wake.clear()
                rounds[0] += 1

        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0.01)  # the reader is waiting
        wake.set()  # a token: the event's waiter is scheduled to finish ...
        task.cancel()  # ... before the reader sees its cancel
        done, _ = await asyncio.wait({task}, timeout=2.0)
        task.cancel()
        return bool(done) and task.cancelled(), rounds[0]

    cancelled, rounds = asyncio.run(scene())
    assert cancelled and rounds == 0


def test_a_failed_engine_step_is_an_error_not_a_hang():
    from moecarve.runtime import load_runtime
    from moecarve.serve.app import create_app

    loaded = load_runtime(str(REFERENCE_LM), precision="fp32", threads=1, max_ctx=64, max_slots=2)
    real, calls = loaded.runtime.step, [0]

    def step(*args):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("a simulated fault")
        return real(*args)

    loaded.runtime.step = step
    with running(create_app(loaded)) as base:
        body = {"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
        assert r.status_code == 500 and "Traceback" not in r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "a simulated fault" in err["message"]
        health = httpx.get(f"{base}/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "error"
        again = httpx.post(f"{base}/v1/completions", json=body, timeout=30)  # refused at once, not left waiting
        assert again.status_code == 503 and again.json()["error"]["code"] == "engine_stopped"


# ---------------------------------------------------------------------- moecarve serve
def test_serve_without_the_extra_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    from moecarve.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "starlette" else real(name, *a))
    assert main(["serve", str(REFERENCE_LM)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'moecarve[serve]'" in err[0]


def test_serve_refuses_a_port_in_use_before_loading(capsys):
    from moecarve.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(REFERENCE_LM), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]


def test_serve_command_end_to_end():
    port = free_port()
    cmd = [sys.executable, "-m", "moecarve", "serve", str(REFERENCE_LM), "--port", str(port), "--threads", "1",
           "--max-ctx", "128", "--max-batch", "2", "--served-name", "ref", "--precision", "fp32"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "the server did not come up"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health["slots"] == 2 and health["max_ctx"] == 128 and health["model"] == "ref"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["ref"]
        r = client.completions.create(model="reference-lm", prompt=PROMPTS[0], max_tokens=8, temperature=0)  # folder name
        assert r.usage.completion_tokens == 8 and r.choices[0].text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert f"serving ref on http://127.0.0.1:{port}/v1: 2 sequences at a time" in err
