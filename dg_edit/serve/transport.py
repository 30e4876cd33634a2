"""HTTP and websockets on one port: uvicorn, with the `websockets` library's protocol for `/ws`.

Why uvicorn: the websocket server of the `websockets` library cannot read request bodies, and the
OpenAI and llama.cpp APIs are POSTs. uvicorn serves both on one port and, with
`ws="websockets-sansio"`, still runs every websocket through the `websockets` library's own
protocol implementation (its `ServerProtocol`: framing, the `max_size` check closing with 1009,
keepalive pings, permessage-deflate), the part of dg-edit's service that its tests and clients rely
on. (uvicorn's `ws="websockets"` is built on the legacy `websockets` API, deprecated since 14.0.)

This is the one module that reaches below uvicorn's `Config`; each reach names what it needs:

- `_WebSocketProtocol` subclasses uvicorn's sans-I/O websocket protocol (a documented choice of
  `Config.ws`, which accepts a class) to give each connection a small kernel send buffer and a small
  transport write buffer, and a short closing handshake. A lagging client then makes the service's
  sender wait at once, and its drafts are coalesced (`outbox.py`) rather than piled up in buffers.
- `_Server.capture_signals` is a no-op: `dg-edit serve` handles SIGINT/SIGTERM itself and exits 0
  after a clean shutdown, where uvicorn would re-raise the signal after serving.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any, Iterator

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

# Kernel send buffer per websocket connection, and the transport's write buffer high-water mark. Left
# to autotuning, Linux lets the kernel buffer grow to megabytes (on loopback at once), so a lagging
# client would be sent seconds-old drafts from buffers before coalescing ever started. 16 KiB holds
# several step frames: plenty for a client that keeps up, little staleness for one that does not.
SEND_BUFFER_BYTES = 16 * 1024
# How long a closing handshake may take (uvicorn's default is 10 s): a client that stopped reading
# never answers, and shutting down should not wait for it.
CLOSE_TIMEOUT_S = 3.0


class _WebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.close_timeout = CLOSE_TIMEOUT_S

    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        transport.set_write_buffer_limits(high=SEND_BUFFER_BYTES)
        super().connection_made(transport)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_server(app, *, max_message_bytes: int, server_header: str) -> uvicorn.Server:
    """A uvicorn server for `app` (not yet listening: `serve(sockets)` it)."""
    config = uvicorn.Config(
        app,
        http="h11",  # pure Python, a dependency of uvicorn itself: no optional C extension to build
        ws=_WebSocketProtocol,
        ws_max_size=max_message_bytes,
        ws_ping_interval=20.0, ws_ping_timeout=20.0,  # as the websockets library's own defaults
        lifespan="off",
        log_config=None,  # leave logging to dg-edit serve
        access_log=False,
        server_header=False, headers=[("server", server_header)],
        timeout_graceful_shutdown=CLOSE_TIMEOUT_S,
    )
    return _Server(config)


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for `host:port`, as `asyncio.start_server` would bind them ("" = every
    interface, both IPv4 and IPv6); a port of 0 is picked once and shared by every address.

    Raises `OSError` (address in use, permission denied) here, before uvicorn would turn it into an
    exit of its own.
    """
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[:2]) in seen:
                continue
            seen.add((family, address[:2]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
