"""The OpenAI-compatible ASGI app: every request becomes a sequence of ONE shared Engine, whose
background thread decodes all running sequences together (requests join and leave at any step).

    GET  /health               engine state (running / waiting / free slots)
    GET  /v1/models            the served model (its aliases are accepted in requests too)
    POST /v1/completions       prompt -> text
    POST /v1/chat/completions  messages -> the assistant's answer (chat template, or a plain format)

`stream: true` answers as server-sent events ending with `data: [DONE]`. A client that goes away
(mid-stream or while waiting for a whole answer) cancels its sequence, which frees its slot at
the engine's next step. Errors are OpenAI-shaped (moecarve.serve.protocol) and never carry a
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..runtime import Engine, Loaded, RequestError, SamplingParams, TextStream
from . import prompt as chat_prompt
from . import protocol as P

MAX_BODY = 1 << 20  # bytes: a context of a few thousand tokens is tens of kilobytes of JSON
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# how often a waiting job looks for an end no token announced (a cancel, a failed engine step);
# a finished request is normally seen at once, on its last token
POLL_S = 0.02


def _line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class Service:
    """What every endpoint shares: the engine, the tokenizer, the names the model answers to."""

    def __init__(self, loaded: Loaded, served_name: str | None = None, aliases: tuple[str, ...] = (),
                 max_body: int = MAX_BODY):  # fmt: skip
        self.engine = Engine(loaded.runtime, loaded.eos_ids)
        self.runtime = loaded.runtime
        self.tokenizer = loaded.tokenizer
        folder = Path(loaded.name).name or loaded.name
        self.name = served_name or folder
        # the served name, the model argument as given and its folder name
        self.names = {self.name, loaded.name, folder, *aliases}
        self.max_body = max_body
        self.created = P.now()
        self.cancelled = 0  # sequences cut short because their client left

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.names:
            raise P.ApiError(404, f"the model '{model}' does not exist; this server serves '{self.name}'",
                             "model_not_found", "model")  # fmt: skip

    def check_engine(self) -> None:
        if self.engine.error is not None:
            raise P.ApiError(503, f"the decode engine stopped: {_line(self.engine.error)}", "engine_stopped")


class Job:
    """One generation on the shared engine, read from the event loop: text deltas as they become
    final (stop strings applied), then `finish_reason` and the tokens it used."""

    def __init__(self, service: Service, prompt_ids: list[int], max_new: int, sampling: SamplingParams,
                 stop: list[str]):  # fmt: skip
        self.service = service
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.text = TextStream(service.tokenizer, stop)
        self.prompt_tokens = len(prompt_ids)
        self.used = 0  # generated tokens read so far
        self.finish_reason: str | None = None
        try:
            self.req = service.engine.submit(prompt_ids, max_new, sampling, on_token=self._on_token)
        except RequestError as e:
            raise P.ApiError(400, str(e), "invalid_value") from None

    def _on_token(self, req, token_id: int) -> None:  # the engine's thread
        try:
            self.loop.call_soon_threadsafe(self.wake.set)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    async def deltas(self) -> AsyncIterator[str]:
        req = self.req
        while True:
            done = req.done.is_set()  # read before the output: once done, the output is complete
            out = req.output
            while self.used < len(out):
                delta = self.text.push(out[self.used])
                self.used += 1
                if self.text.finished:  # a stop string: the engine need not go on
                    req.cancel()
                    self.finish_reason = "stop"
                    if delta:
                        yield delta
                    return
                if delta:
                    yield delta
            if done:
                if req.finish_reason == "error":
                    raise P.ApiError(500, f"the generation failed: {_line(self.service.engine.error or 'unknown')}")
                tail = self.text.flush()
                if tail:
                    yield tail
                self.finish_reason = "length" if req.finish_reason == "length" else "stop"
                return
            self.wake.clear()
            if len(req.output) > self.used:
                continue
            await _wait(self.wake, POLL_S)

    def cancel(self) -> None:
        """The client left: free the slot (a no-op for a finished sequence). Counted first: once the
        engine drops the request, /health already shows the cancel (a client polling it until the
        server is idle must not see the slot free and the count not yet moved)."""
        if not self.req.done.is_set() and not self.req.cancelled:
            self.service.cancelled += 1
            self.req.cancel()

    def usage(self) -> dict:
        return P.usage(self.prompt_tokens, self.used)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for `event` at most `timeout` seconds. Not `asyncio.wait_for`: before Python 3.12 it
    swallows a cancel that arrives as the event is set (cpython gh-86296), and the job's reader
    would then run on to the end of a generation whose client has gone."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(work: Awaitable, receive, job: Job):
    """Run `work` unless the client disconnects first; then cancel the job (either way, a job
    still running when this returns is cancelled). Returns work's result, None if the client left."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return None
    finally:
        job.cancel()  # first: the engine frees the slot even while `work` winds down
        for t in (task, listener):
            t.cancel()
        await asyncio.gather(task, listener, return_exceptions=True)


class EventStream:
    """An ASGI response of server-sent events; the client's disconnect cancels the job."""

    def __init__(self, events: AsyncIterator[bytes], job: Job):
        self.events = events
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]  # fmt: skip

        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            try:
                async for chunk in self.events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except P.ApiError as e:  # the engine failed mid-stream: say so in the stream
                await send({"type": "http.response.body", "body": P.event(e.body()), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _unless_disconnected(stream(), receive, self.job)
        except OSError:  # the connection broke while sending: the same as a disconnect
            self.job.cancel()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 past `limit` bytes (by Content-Length, or as it arrives)."""
    length = request.headers.get("content-length", "")
    too_big = P.ApiError(413, f"the request body is larger than {limit} bytes", "request_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(loaded: Loaded, served_name: str | None = None, aliases: tuple[str, ...] = (),
               max_body: int = MAX_BODY) -> Starlette:  # fmt: skip
    """The ASGI app over one Engine on `loaded.runtime` (its max_slots is the batch). The engine
    thread starts and stops with the app's lifespan."""
    service = Service(loaded, served_name, aliases, max_body)

    async def health(request: Request) -> JSONResponse:
        engine = service.engine
        state = {"status": "ok" if engine.error is None else "error", "model": service.name,
                 "slots": service.runtime.max_slots, "free_slots": len(engine.free_slots),
                 "running": len(engine.running), "waiting": len(engine.waiting), "cancelled": service.cancelled,
                 "max_ctx": service.runtime.max_ctx}  # fmt: skip
        if engine.error is not None:
            state["error"] = _line(engine.error)
        return JSONResponse(state, status_code=200 if engine.error is None else 503)

    def model_card() -> dict:
        return {"id": service.name, "object": "model", "created": service.created, "owned_by": "moecarve",
                "max_model_len": service.runtime.max_ctx}  # fmt: skip

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> JSONResponse:
        service.check_model(request.path_params["model"])
        return JSONResponse(model_card())

    async def prepare(request: Request, parse: Callable[[dict], P.GenerationRequest]):
        """Parse, validate and tokenize; (request fields, prompt ids, max new tokens, stop strings)."""
        service.check_engine()
        g = parse(P.parse_json(await read_body(request, service.max_body)))
        service.check_model(g.model)
        stop = list(g.stop)
        if g.messages is not None:
            try:
                ids = chat_prompt.encode(service.tokenizer, g.messages)
            except chat_prompt.PromptError as e:
                raise P.ApiError(400, str(e), "invalid_value", "messages") from None
            stop += chat_prompt.stop_strings(service.tokenizer)
            default = None  # chat: up to the end of the context
        else:
            ids = list(service.tokenizer(g.prompt)["input_ids"]) if isinstance(g.prompt, str) else g.prompt
            default = COMPLETION_DEFAULT_TOKENS
        ctx = service.runtime.max_ctx
        if len(ids) >= ctx:
            raise P.ApiError(400, f"the prompt has {len(ids)} tokens; this model's context holds {ctx} (prompt and "
                             "completion together)", "context_length_exceeded")  # fmt: skip
        if g.max_tokens is None:
            max_new = ctx - len(ids) if default is None else min(default, ctx - len(ids))
        elif len(ids) + g.max_tokens > ctx:
            raise P.ApiError(400, f"this model's context holds {ctx} tokens; the request needs {len(ids) + g.max_tokens} "
                             f"({len(ids)} in the prompt, max_tokens {g.max_tokens})", "context_length_exceeded",
                             "max_tokens")  # fmt: skip
        else:
            max_new = g.max_tokens
        return g, ids, max_new, stop

    async def answer(request: Request, chat: bool):
        """Both generation endpoints: a whole answer, or server-sent events with stream: true."""
        g, ids, max_new, stop = await prepare(request, P.parse_chat if chat else P.parse_completion)
        job = Job(service, ids, max_new, g.sampling, stop)
        shape = P.Shape(service.name, chat)
        if g.stream:

            async def events() -> AsyncIterator[bytes]:
                for obj in shape.opening():
                    yield P.event(obj)
                async for delta in job.deltas():
                    yield P.event(shape.chunk(delta, None))
                yield P.event(shape.chunk("", job.finish_reason))
                if g.include_usage:
                    yield P.event(shape.usage_chunk(job.usage()))
                yield P.DONE

            return EventStream(events(), job)
        text = await _unless_disconnected(_collect(job), request.receive, job)
        return JSONResponse(shape.response(text or "", job.finish_reason, job.usage()))

    async def completions(request: Request):
        return await answer(request, chat=False)

    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    async def api_error(request: Request, exc: P.ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            e = P.ApiError(404, f"no such endpoint: {request.method} {request.url.path}", "not_found")
        elif exc.status_code == 405:
            e = P.ApiError(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed")
        else:
            e = P.ApiError(exc.status_code, str(exc.detail), None)
        return JSONResponse(e.body(), status_code=e.status)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        e = P.ApiError(500, f"internal error: {_line(exc)}")
        return JSONResponse(e.body(), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        try:
            yield
        finally:
            service.engine.stop()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={P.ApiError: api_error, HTTPException: http_error, Exception: server_error})  # fmt: skip
    app.state.service = service
    return app


async def _collect(job: Job) -> str:
    return "".join([delta async for delta in job.deltas()])
