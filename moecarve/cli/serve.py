"""`moecarve serve MODEL`: the OpenAI-compatible HTTP API (moecarve.serve.app) under uvicorn.

Needs the optional extra: pip install 'moecarve[serve]'. Listens on 127.0.0.1 unless --host says
otherwise; the port is checked before the model loads.
"""

from __future__ import annotations

import argparse
import sys

from .common import add_command, at_least
from .generate import add_runtime_args, load

EXTRA_HINT = "pip install 'moecarve[serve]'"


def _port(text: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {text}")
    return value


def register(sub) -> None:
    p = add_command(
        sub, "serve",
        help="an OpenAI-compatible HTTP server over the decode runtime (needs moecarve[serve])",
        description="Serve a dense model or a carved folder with an OpenAI-compatible API: GET /health, GET "
        "/v1/models, POST /v1/completions and /v1/chat/completions (stream: true as server-sent events). "
        "Concurrent requests are decoded together, --max-batch at a time; a client that disconnects frees its "
        f"slot. Needs the serve extra: {EXTRA_HINT}.",
    )  # fmt: skip
    add_runtime_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 opens the server to the network)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port to listen on")
    p.add_argument("--max-batch", type=at_least(1), default=8, metavar="N",
                   help="sequences decoded together; more requests wait for a free slot")  # fmt: skip
    p.add_argument("--served-name", default=None, metavar="NAME",
                   help="the model name clients send (default: the folder's name; MODEL as given is accepted too)")  # fmt: skip
    p.add_argument("--max-body", type=at_least(1), default=1 << 20, metavar="BYTES",
                   help="largest request body; larger ones get 413")  # fmt: skip
    p.set_defaults(func=run)


def check_extra() -> None:
    import importlib.util

    from ..errors import UsageError

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"moecarve serve needs {' and '.join(missing)}: {EXTRA_HINT}")


def check_port(host: str, port: int) -> None:
    """Refuse an address that cannot be listened on (in use, not this machine's) before loading."""
    import socket

    from ..errors import UsageError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no obstacle
        try:
            s.bind(address)
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror} (choose another --port or --host)") from None


def run(args) -> int:
    from ..io.loading import check_model

    check_extra()
    check_model(args.model)  # a missing model says so before anything else
    check_port(args.host, args.port)
    loaded = load(args, max_slots=args.max_batch)
    import uvicorn

    from ..serve.app import create_app

    app = create_app(loaded, args.served_name, max_body=args.max_body)
    service = app.state.service
    rt = loaded.runtime
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {service.name} on http://{host}:{args.port}/v1: {rt.max_slots} sequences at a time, a context "
          f"of {rt.max_ctx} tokens, {rt.threads} threads, {rt.precision}", file=sys.stderr, flush=True)  # fmt: skip
    # uvicorn handles Ctrl-C itself: open streams get a few seconds, then the engine stops
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
