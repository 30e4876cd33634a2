"""`dg-edit serve`: a websocket service that streams the canvas to web editors, step by step.

Why a service: web editors (CodeMirror, Monaco, the demo page at `/`) cannot load a model; they open
`ws://HOST:PORT/ws`, send infill/rewrite requests and watch every denoising step arrive as a frame.
The protocol is documented in `dg_edit/schema/protocol.schema.json` and implemented in
`dg_edit.protocol`; who may connect is decided in `dg_edit.http_gate`; how a slow client is kept
from piling up drafts is `dg_edit.outbox`. This module runs requests:

- Each request is an asyncio task reading `dg_edit.aio.aiter_events`, so the model runs in a worker
  thread and the event loop only moves frames; requests on one connection run concurrently and the
  engine interleaves their steps.
- Each connection has one sender task draining its `Outbox`; a lagging client makes only its own
  sender wait, and its drafts are coalesced to the latest one meanwhile.
- Limits come from `Settings`: `max_message_bytes` (websockets closes with 1009), `max_inflight` per
  connection (`busy`), `request_timeout_s` (`timeout`).
- A document is known through its requests: a request with a `session` tells the engine that the
  session's document reads prefix (+ selection) + suffix, and idle prefill encodes it while the
  connection is quiet (`Engine.prefill`), so the next request anywhere in it starts warm. The
  document is forgotten when the connection closes. Typed-ahead answers come from the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from . import __version__, protocol
from .aio import aiter_events
from .config import Settings
from .events import Done, Step
from .http_gate import WS_PATH, Gate, check_origin_value, is_loopback, url_host
from .outbox import Outbox, OutboxFull
from .protocol import CancelRequest, InfillRequest, ProtocolError, RewriteRequest

log = logging.getLogger("dg_edit.service")

# Worker threads for model streams, shared by all connections. The engine runs one step at a time
# under its lock, so threads beyond the number of live requests buy nothing; fewer than that would
# make a new request wait for a whole other request before its first step.
MODEL_THREADS = 64
# Requests running at once on the whole service: one model thread each. More would wait invisibly in
# the executor's queue for a whole other request to end (a starved client, no step for seconds), so
# past this the client is told `busy` at once instead.
MAX_INFLIGHT_TOTAL = MODEL_THREADS
# Kernel send buffer per connection, and websockets' write buffer high-water mark. Left to
# autotuning, Linux lets the kernel buffer grow to megabytes (on loopback at once), so a lagging
# client would be sent seconds-old drafts from buffers before coalescing ever started. 16 KiB holds
# several step frames: plenty for a client that keeps up, little staleness for one that does not.
SEND_BUFFER_BYTES = 16 * 1024
# How long a closing handshake may take (websockets' default is 10 s): a client that stopped reading
# never answers, and shutting down should not wait for it.
CLOSE_TIMEOUT_S = 3.0
TOKEN_ENV = "DG_EDIT_TOKEN"


class Service:
    """One engine served over websockets; holds what every connection shares."""

    def __init__(self, engine, settings: Settings | None = None, *, host: str | None = None,
                 port: int | None = None, token: str | None = None, allowed_origins: Sequence[str] = ()):
        self.engine = engine
        self.settings = settings or engine.settings
        self.host = host if host is not None else self.settings.host
        self.port = port if port is not None else self.settings.port
        self.token = token or None
        self.executor = ThreadPoolExecutor(MODEL_THREADS, thread_name_prefix="dg-edit-model")
        self.clients: set[Client] = set()
        self._numbers = itertools.count(1)
        self._coalesced_closed = 0  # drafts coalesced on connections that have closed since
        self._started = time.monotonic()
        info = engine.info()
        self._model = {k: info.get(k) for k in ("model", "device", "dtype", "parameters", "canvas_length")}
        self.gate = Gate(host=self.host, token=self.token,
                         allowed_origins=frozenset(check_origin_value(o) for o in allowed_origins),
                         health=self.health)
        self.server: Server | None = None

    def health(self) -> dict[str, Any]:
        """GET /healthz: what is loaded, and how busy the service is."""
        return {
            "status": "ok",
            "version": __version__,
            **self._model,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "connections": len(self.clients),
            "inflight": sum(len(c.inflight) for c in self.clients),
            # step frames replaced by a newer draft before a lagging client read them
            "drafts_coalesced": self._coalesced_closed + sum(c.outbox.coalesced for c in self.clients),
            "cache": self._cache(),
        }

    def _cache(self) -> dict[str, Any] | None:
        """The engine's encoder caches and idle prefill, with a count instead of the documents' names."""
        info = self.engine.cache_info() if hasattr(self.engine, "cache_info") else None
        return None if info is None else {**info, "documents": len(info["documents"])}

    async def start(self) -> Server:
        self.server = await serve(
            self._handle, self.host, self.port,
            process_request=self.gate.check,
            max_size=self.settings.max_message_bytes,
            write_limit=SEND_BUFFER_BYTES,
            close_timeout=CLOSE_TIMEOUT_S,
            server_header=f"dg-edit/{__version__}",
        )
        return self.server

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound; the port differs from `self.port` when that was 0."""
        assert self.server is not None, "start() first"
        sockname = self.server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        for client in list(self.clients):
            client.stop_requests()  # the model stops now, not after a stalled client's closing handshake
        if self.server is not None:
            self.server.close()  # closes every connection with 1001
            await self.server.wait_closed()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> "Service":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _handle(self, connection: ServerConnection) -> None:
        client = Client(self, connection, next(self._numbers))
        self.clients.add(client)
        try:
            await client.run()
        finally:
            self.clients.discard(client)
            self._coalesced_closed += client.outbox.coalesced


class Client:
    """One websocket connection: its in-flight requests, its outbox and its sender task."""

    def __init__(self, service: Service, connection: ServerConnection, number: int):
        self.service = service
        self.engine = service.engine
        self.settings = service.settings
        self.connection = connection
        self.number = number
        self.inflight: dict[str, asyncio.Task] = {}
        self._cancel_requested: set[str] = set()
        self._sessions: set[str] = set()
        self.outbox = Outbox()
        self._closing: asyncio.Task | None = None
        sock = connection.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop(), name=f"dg-edit-ws{self.number}-sender")
        try:
            async for message in self.connection:
                self._receive(message)
        except ConnectionClosed:
            # The client went away mid-stream, or sent a frame over max_message_bytes (websockets has
            # already closed with 1009). Either way: stop its requests below, keep serving the others.
            log.info("connection %d closed: %s", self.number, self.connection.close_reason or
                     self.connection.close_code)
        finally:
            tasks = self.stop_requests()
            await asyncio.gather(*tasks, return_exceptions=True)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            loop = asyncio.get_running_loop()
            for session in self._sessions:  # forget() waits for the engine's lock: not on the loop
                await loop.run_in_executor(self.service.executor, self.engine.forget, session)

    def stop_requests(self) -> list[asyncio.Task]:
        """Cancel every in-flight request (no `cancelled` frames: nobody is listening any more)."""
        tasks = list(self.inflight.values())
        for task in tasks:
            task.cancel()
        return tasks

    # ------------------------------------------------------------------ incoming frames
    def _receive(self, message: str | bytes) -> None:
        try:
            request = protocol.parse_request(message)
            if isinstance(request, CancelRequest):
                self._cancel(request.id)
            else:
                self._start(request)
        except ProtocolError as e:
            self._put_final(protocol.error_frame(e.code, e.message, e.request_id))
        except Exception as e:  # a parser bug must cost one error frame, not the connection
            log.exception("frame on connection %d could not be handled", self.number)
            self._put_final(protocol.error_frame(protocol.BAD_REQUEST, f"frame not understood ({type(e).__name__}: "
                                                                       f"{e})"))

    def _start(self, request: InfillRequest | RewriteRequest) -> None:
        if request.id in self.inflight:
            raise ProtocolError(protocol.DUPLICATE_ID, f"request {request.id!r} is already running on this "
                                                       "connection (it goes on); give each request a new id",
                                request.id)
        if len(self.inflight) >= self.settings.max_inflight:
            raise ProtocolError(protocol.BUSY, f"{len(self.inflight)} requests are already running on this "
                                               f"connection (max_inflight={self.settings.max_inflight}); wait for "
                                               "one to finish or cancel one", request.id)
        running = sum(len(c.inflight) for c in self.service.clients)
        if running >= MAX_INFLIGHT_TOTAL:
            raise ProtocolError(protocol.BUSY, f"{running} requests are running on this service (at most "
                                               f"{MAX_INFLIGHT_TOTAL} at once); try again when one has finished",
                                request.id)
        task = asyncio.create_task(self._serve(request), name=f"dg-edit-ws{self.number}-{request.id}")
        self.inflight[request.id] = task
        task.add_done_callback(lambda t, rid=request.id: self._finished(rid, t))

    def _cancel(self, request_id: str) -> None:
        task = self.inflight.get(request_id)
        # A task that is done has sent its final frame; its done callback just has not run yet. A
        # cancel now must get unknown_id, not silence (cancelling a done task does nothing).
        if task is None or task.done():
            raise ProtocolError(protocol.UNKNOWN_ID, f"no request {request_id!r} is running on this connection "
                                                     "(never sent, or already finished)", request_id)
        if request_id not in self._cancel_requested:
            self._cancel_requested.add(request_id)
            task.cancel()

    def _finished(self, request_id: str, task: asyncio.Task) -> None:
        # A done callback rather than `except CancelledError` in `_serve`: a task cancelled before its
        # first step never enters `_serve`'s body, and it still owes the client a `cancelled` frame.
        self.inflight.pop(request_id, None)
        if request_id in self._cancel_requested:
            self._cancel_requested.discard(request_id)
            if task.cancelled():
                self.outbox.drop_steps(request_id)
                self._put_final(protocol.cancelled_frame(request_id))

    # ------------------------------------------------------------------ running one request
    async def _serve(self, request: InfillRequest | RewriteRequest) -> None:
        """Stream one request's events into the outbox; every failure becomes an `error` frame."""
        rid = request.id
        cancel = threading.Event()
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                events = aiter_events(self._events(request), cancel=cancel, executor=self.service.executor)
                async with contextlib.aclosing(events):
                    async for event in events:
                        frame = protocol.event_frame(event, rid)
                        if isinstance(event, Step):
                            self.outbox.put_step(rid, frame)
                        else:
                            self._put_final(frame)
                            break  # no await after the final frame: a cancel cannot add a second one
        except TimeoutError:
            self.outbox.drop_steps(rid)
            self._put_final(protocol.error_frame(
                protocol.TIMEOUT, f"request ran longer than request_timeout_s={self.settings.request_timeout_s:g} "
                                  "s and was stopped", rid))
        except ValueError as e:  # the engine refused the input (empty prefix and suffix, ...)
            self._put_final(protocol.error_frame(protocol.BAD_REQUEST, str(e), rid))
        except Exception as e:  # a model failure must reach the client, and must not end the connection
            log.exception("request %s on connection %d failed", rid, self.number)
            self._put_final(protocol.error_frame(protocol.MODEL_ERROR, f"{type(e).__name__}: {e}", rid))
        finally:
            cancel.set()

    def _events(self, request: InfillRequest | RewriteRequest) -> Callable[[], Iterator[Step | Done]]:
        session = None
        if request.session is not None:
            session = f"ws{self.number}:{request.session}"  # connections never share a prefix cache entry
            self._sessions.add(session)
        engine = self.engine
        if session is not None:  # the document, as this request shows it: prefilled once we are quiet
            selection = request.selection if isinstance(request, RewriteRequest) else ""
            engine.prefill(session, request.prefix + selection + request.suffix)
        if isinstance(request, InfillRequest):
            return lambda: engine.stream(request.prefix, request.suffix, max_new_tokens=request.max_new_tokens,
                                         seed=request.seed, session=session, single_line=request.single_line)
        return lambda: engine.stream_rewrite(request.prefix, request.selection, request.suffix,
                                             instruction=request.instruction, strength=request.strength,
                                             seed=request.seed, session=session)

    # ------------------------------------------------------------------ outgoing frames
    def _put_final(self, frame: str) -> None:
        try:
            self.outbox.put_final(frame)
        except OutboxFull as e:
            if self._closing is None:
                log.warning("closing connection %d: %s", self.number, e)
                self._closing = asyncio.create_task(self.connection.close(1008, "client is not reading its frames"))

    async def _send_loop(self) -> None:
        while True:
            frame = await self.outbox.get()
            try:
                await self.connection.send(frame)
            except ConnectionClosed:
                return


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    from .cli import add_model_arguments

    parser = argparse.ArgumentParser(
        prog="dg-edit serve",
        description="Websocket service streaming the canvas to web editors; the demo page is at /.")
    parser.add_argument("--host", default=None,
                        help="address to listen on (default: Settings.host, 127.0.0.1); a non-loopback "
                             "address needs a token")
    parser.add_argument("--port", type=int, default=None,
                        help="port (default: Settings.port, 8765; 0 picks a free one and prints it)")
    parser.add_argument("--token", default=None,
                        help=f"require this token (Authorization: Bearer T, or ?token=T); default: ${TOKEN_ENV}")
    parser.add_argument("--allow-origin", dest="allow_origins", action="append", default=[], metavar="ORIGIN",
                        help="also accept websocket connections from pages of this origin, e.g. "
                             "http://localhost:5173 (repeatable); the service's own page is always allowed")
    add_model_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`dg-edit serve ...`; raises `dg_edit.cli.UsageError` for mistakes (exit code 2 from the CLI)."""
    from .cli import UsageError, load_engine, settings_from_args

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
    logging.getLogger("websockets").setLevel(logging.WARNING)
    engine = load_engine(args)
    try:
        return asyncio.run(_serve_until_stopped(engine, settings, host, port, token, origins))
    except OSError as e:  # address in use, permission denied, ...
        raise UsageError(f"cannot listen on {url_host(host)}:{port}: {e.strerror or e}") from None


async def _serve_until_stopped(engine, settings, host, port, token, origins) -> int:
    service = Service(engine, settings, host=host, port=port, token=token, allowed_origins=origins)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with service:
        bound_host, bound_port = service.address
        base = f"http://{url_host(bound_host)}:{bound_port}"
        hint = f"  (open {base}/?token=<token>)" if token else ""
        info = service.health()
        print(f"dg-edit serve: listening on {base}/ and ws://{url_host(bound_host)}:{bound_port}{WS_PATH}{hint}; "
              f"model {info['model']} on {info['device']}", file=sys.stderr, flush=True)
        await stop
    print("dg-edit serve: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    from .cli import main as cli_main

    sys.exit(cli_main(["serve", *sys.argv[1:]]))
