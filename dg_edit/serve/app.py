"""`dg-edit serve`: one port for web editors (websocket, step by step), the editor tools that speak
OpenAI's or llama.cpp's HTTP APIs, and the demo page at `/`.

Why a service: web editors (CodeMirror, Monaco, the demo page) cannot load a model; they open
`ws://HOST:PORT/ws`, send infill/rewrite requests and watch every denoising step arrive as a frame
(`ws.py`; the protocol is `protocol.py`, documented in `dg_edit/schema/protocol.schema.json`).
Editor plug-ins built for local models (llama.vim, Continue, minuet-ai.nvim, ...) call
`/infill`, `/v1/completions` and `/v1/chat/completions` (`http_api.py`, `openai_api.py`,
`llama_api.py`). Who may connect is decided in `gate.py`, in front of every route; `transport.py`
puts HTTP and websockets on one port (uvicorn, with the `websockets` library's protocol for `/ws`);
every route reaches the engine through `runner.py`; `metrics.py` counts what they do (`GET /metrics`).

`Service` holds what every connection shares: the engine (None while it loads: the routes answer
503 meanwhile), the model worker threads, the limits.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from .. import __version__
from ..config import REPLICA_HEADER, TOKEN_ENV, Settings
from .errors import render_refusal
from .gate import WS_PATH, Gate, GateMiddleware, check_origin_value, deny_websocket, is_loopback, url_host
from .http_api import HttpApi
from .metrics import Metrics
from .page import Page
from .transport import listen, make_server
from .ws import Client

log = logging.getLogger("dg_edit.serve")

# Worker threads for model streams, shared by all connections. The engine runs one step at a time
# under its lock, so threads beyond the number of live requests buy nothing; fewer than that would
# make a new request wait for a whole other request before its first step.
MODEL_THREADS = 64
# Requests running at once on the whole service: one model thread each. More would wait invisibly in
# the executor's queue for a whole other request to end (a starved client, no step for seconds), so
# past this the client is told `busy` at once instead.
MAX_INFLIGHT_TOTAL = MODEL_THREADS


class Service:
    """One engine served on one port; holds what every connection shares."""

    def __init__(self, engine=None, settings: Settings | None = None, *, host: str | None = None,
                 port: int | None = None, token: str | None = None, allowed_origins: Sequence[str] = ()):
        if engine is None and settings is None:
            raise ValueError("a Service without an engine (yet) needs its settings")
        self.engine = None
        self.settings = settings or engine.settings
        self.host = host if host is not None else self.settings.host
        self.port = port if port is not None else self.settings.port
        self.token = token or None
        self.executor = ThreadPoolExecutor(MODEL_THREADS, thread_name_prefix="dg-edit-model")
        self.clients: set[Client] = set()
        self._numbers = itertools.count(1)
        self._coalesced_closed = 0  # drafts coalesced on connections that have closed since
        self._started = time.monotonic()
        self.started_at = time.time()
        self.model_info: dict[str, Any] = {}
        self.model_id = ""
        # Which replica answered (X-DG-Edit-Replica, /healthz): replicas behind a load balancer differ here.
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.replica_header = (REPLICA_HEADER.lower().encode(), self.replica.encode("latin-1", "replace"))
        self.metrics = Metrics(cache_info=self._cache_info, inflight=self.inflight)
        self.page = Page()
        self.http = HttpApi(self)
        self.allowed_origins = frozenset(check_origin_value(o) for o in allowed_origins)
        self.gate = Gate(host=self.host, token=self.token, allowed_origins=self.allowed_origins,
                         # the page's files, and llama.cpp's health check (public there too)
                         public_paths=frozenset({*self.page.files, "/health", "/v1/health"}))
        self.app = self._build_app()
        if engine is not None:
            self.set_engine(engine)
        self._sockets: list = []
        self._server = None
        self._serving: asyncio.Task | None = None

    def set_engine(self, engine) -> None:
        """The model is loaded: from now on every route serves it."""
        info = engine.info()
        self.model_info = {k: info.get(k) for k in ("model", "device", "dtype", "parameters", "canvas_length")}
        self.model_id = Path(str(info.get("model") or "dg-edit")).name  # the directory name, e.g. "default"
        engine.observer = self.metrics  # every denoising step and admission is counted (dg_edit.serve.metrics)
        self.engine = engine

    def _build_app(self) -> Starlette:
        routes = [
            WebSocketRoute(WS_PATH, self._websocket),
            Route("/healthz", self._healthz),
            Route("/metrics", self._metrics, methods=["GET"]),
            *self.http.routes(),
            Route("/{path:path}", self.page.respond),
        ]
        middleware = [Middleware(ReplicaHeader, header=self.replica_header),
                      Middleware(GateMiddleware, gate=self.gate, render=render_refusal)]
        if self.allowed_origins:  # pages of these origins may also call the HTTP APIs from a browser
            middleware.insert(0, Middleware(CORSMiddleware, allow_origins=sorted(self.allowed_origins),
                                            allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                                            max_age=600))
        return Starlette(routes=routes, middleware=middleware)

    def health(self) -> dict[str, Any]:
        """GET /healthz: what is loaded, and how busy the service is."""
        return {
            "status": "ok" if self.engine is not None else "loading",
            "version": __version__,
            "replica": self.replica,
            **self.model_info,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "connections": len(self.clients),
            "inflight": self.inflight(),
            # step frames replaced by a newer draft before a lagging client read them
            "drafts_coalesced": self._coalesced_closed + sum(c.outbox.coalesced for c in self.clients),
            "cache": self._cache(),
        }

    def _cache(self) -> dict[str, Any] | None:
        """The engine's encoder caches and idle prefill, with a count instead of the documents' names."""
        info = self._cache_info()
        return None if info is None else {**info, "documents": len(info["documents"])}

    def _cache_info(self) -> dict[str, Any] | None:
        return self.engine.cache_info() if self.engine is not None and hasattr(self.engine, "cache_info") else None

    def inflight(self) -> int:
        """Engine streams running now, on every connection and route."""
        return sum(len(c.inflight) for c in self.clients) + self.http.inflight()

    def service_busy(self, n: int = 1) -> str | None:
        """Why `n` new engine streams cannot start now (every model thread taken), or None."""
        running = self.inflight()
        if running + n > MAX_INFLIGHT_TOTAL:
            return (f"{running} requests are running on this service (at most {MAX_INFLIGHT_TOTAL} at once); try "
                    "again when one has finished")
        return None

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse(self.health(), 200 if self.engine is not None else 503)

    async def _metrics(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, 200, media_type=content_type)

    async def _websocket(self, websocket: WebSocket) -> None:
        if self.engine is None:
            await deny_websocket(websocket.scope, websocket.receive, websocket.send, PlainTextResponse(
                "the model is still loading; connect again in a few seconds\n", 503, headers={"Retry-After": "5"}))
            return
        client = Client(self, websocket, next(self._numbers))
        self.clients.add(client)
        try:
            await client.run()
        finally:
            self.clients.discard(client)
            self._coalesced_closed += client.outbox.coalesced

    # ------------------------------------------------------------------ lifetime
    async def start(self) -> "Service":
        """Listen (raises `OSError` when the address cannot be had) and serve in the background."""
        self._sockets = listen(self.host, self.port)
        self._server = make_server(self.app, max_message_bytes=self.settings.max_message_bytes,
                                   server_header=f"dg-edit/{__version__}")
        self._serving = asyncio.create_task(self._server.serve(sockets=self._sockets), name="dg-edit-serve")
        while not self._server.started:
            if self._serving.done():
                await self._serving  # raises what stopped it
                raise RuntimeError("the server stopped before it started")
            await asyncio.sleep(0.01)
        return self

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound; the port differs from `self.port` when that was 0."""
        assert self._sockets, "start() first"
        sockname = self._sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        for client in list(self.clients):
            client.stop_requests()  # the model stops now, not after a stalled client's closing handshake
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            await asyncio.gather(self._serving, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> "Service":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()


class ReplicaHeader:
    """ASGI middleware: every HTTP answer names the replica that gave it (`X-DG-Edit-Replica: host:pid`),
    so that behind a load balancer a client, a log or a test can tell which one served a document."""

    def __init__(self, app, header: tuple[bytes, bytes]):
        self.app = app
        self.header = header

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    from ..startup import add_model_arguments
    from ..distributed import add_parallel_arguments

    parser = argparse.ArgumentParser(
        prog="dg-edit serve",
        description="One port for web editors (websocket /ws, the demo page at /) and editor tools that speak "
                    "OpenAI's API (/v1/completions, /v1/chat/completions) or llama.cpp's (/infill).")
    parser.add_argument("--host", default=None,
                        help="address to listen on (default: Settings.host, 127.0.0.1); a non-loopback "
                             "address needs a token")
    parser.add_argument("--port", type=int, default=None,
                        help="port (default: Settings.port, 8765; 0 picks a free one and prints it)")
    parser.add_argument("--token", default=None,
                        help=f"require this token (Authorization: Bearer T, or ?token=T); default: ${TOKEN_ENV}")
    parser.add_argument("--allow-origin", dest="allow_origins", action="append", default=[], metavar="ORIGIN",
                        help="also accept websocket connections and API calls from pages of this origin, e.g. "
                             "http://localhost:5173 (repeatable); the service's own page is always allowed")
    add_model_arguments(parser)
    add_parallel_arguments(parser)  # torchrun: every rank loads a shard in `load_engine`, only rank 0 serves
    return parser


def main(argv: list[str] | None = None) -> int:
    """`dg-edit serve ...`; raises `dg_edit.errors.UsageError` for mistakes (exit code 2 from the CLI)."""
    from ..errors import UsageError
    from ..startup import load_engine, settings_from_args

    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)  # a bad --config FILE is a UsageError already
    host = args.host if args.host is not None else settings.host
    port = args.port if args.port is not None else settings.port
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    token = token or None
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {port}")
    if not is_loopback(host) and token is None:
        raise UsageError(f"refusing to listen on {host or 'every interface'!r} without a token: anyone who can "
                         f"reach it could drive the model. Set {TOKEN_ENV} (or --token), or use --host 127.0.0.1")
    try:
        origins = [check_origin_value(o) for o in args.allow_origins]
    except ValueError as e:
        raise UsageError(str(e)) from None
    logging.basicConfig(level=logging.INFO, format="dg-edit serve: %(message)s")
    logging.getLogger("uvicorn").setLevel(logging.WARNING)  # its start/stop chatter; errors still show
    load = lambda: load_engine(args)  # noqa: E731
    if getattr(args, "parallel", None):
        # Under torchrun only rank 0 returns from load_engine (the others mirror it until the launch
        # ends), so the model is loaded before anything listens: other ranks never open a socket.
        engine = load_engine(args)
        load = lambda: engine  # noqa: E731
    try:
        return asyncio.run(_serve_until_stopped(load, settings, host, port, token, origins))
    except OSError as e:  # address in use, permission denied, ...
        raise UsageError(f"cannot listen on {url_host(host)}:{port}: {e.strerror or e}") from None


async def _serve_until_stopped(load, settings, host, port, token, origins) -> int:
    """Listen at once (the routes answer 503 while the model loads), load, serve until SIGINT/SIGTERM.

    The "listening on" line is printed once the model is loaded: scripts (and tests) that wait for
    it get a service that answers.
    """
    loop = asyncio.get_running_loop()
    service = Service(None, settings, host=host, port=port, token=token, allowed_origins=origins)
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with service:
        bound_host, bound_port = service.address
        base = f"http://{url_host(bound_host)}:{bound_port}"
        print(f"dg-edit serve: loading the model; bound to {base}/ (requests get 503 until it is loaded)",
              file=sys.stderr, flush=True)
        loading = loop.run_in_executor(None, load)  # a bad model directory is a UsageError from here
        await asyncio.wait({loading, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.done():
            service.set_engine(loading.result())
            hint = f"  (open {base}/?token=<token>)" if token else ""
            info = service.health()
            print(f"dg-edit serve: listening on {base}/ and ws://{url_host(bound_host)}:{bound_port}{WS_PATH}{hint} "
                  f"(OpenAI API at {base}/v1, llama.cpp /infill at {base}/infill); model {info['model']} on "
                  f"{info['device']}", file=sys.stderr, flush=True)
            await stop
    print("dg-edit serve: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    from ..cli import main as cli_main

    sys.exit(cli_main(["serve", *sys.argv[1:]]))
