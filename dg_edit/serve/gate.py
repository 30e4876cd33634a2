"""Who may talk to `dg-edit serve`: one check in front of every route, HTTP and websocket alike.

Every request passes `Gate.check` first (`GateMiddleware` runs it before any route sees the request):

1. Token. With a token configured, everything but the page's own static files needs
   `Authorization: Bearer T` (what the OpenAI SDK sends for its `api_key`, and llama.vim for its
   `api_key`) or `?token=T` (browsers cannot set headers on a websocket); otherwise 401. Compared
   with `hmac.compare_digest` so the answer time does not leak how much of a guess was right. The
   page's files are public (they hold no secrets, and a browser fetches them without the token);
   the page reads the token from its own URL (`/?token=T`).
2. Host (only without a token). A page the user happens to visit can point its own host name at
   127.0.0.1 (DNS rebinding); refusing unknown `Host` headers stops it reading /healthz or the page.
3. Origin, on everything but the static files. Browsers always send `Origin` on websockets and
   cross-site POSTs; the server's own page, the `--allow-origin` list, and clients without an
   `Origin` header (scripts, editors: they are not a web page the user happens to visit) are
   allowed; anything else gets 403, so a page on the web can neither drive the model through the
   websocket nor through the HTTP API.

A refusal is a `Refusal` (status, message, headers); `GateMiddleware` renders it in the shape the
route's clients understand (`render_refusal`: OpenAI's error object under /v1, llama.cpp's under
its routes, plain text elsewhere) and, for a websocket, as the HTTP answer to its handshake.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

WS_PATH = "/ws"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_HOST_HEADER = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]+)?|\[[0-9A-Fa-f:.]+\](:[0-9]+)?")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; "" and 0.0.0.0 mean every interface, so False."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def url_host(host: str) -> str:
    """A host as it appears in a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def check_origin_value(origin: str) -> str:
    """Validate one `--allow-origin` value (scheme://host[:port], no path); returns it normalised."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise ValueError(f"--allow-origin must look like http://host:port (no path), got {origin!r}")
    return f"{parts.scheme}://{parts.netloc}".lower()


def _split_host_header(value: str) -> str:
    """The host name of a `Host` header value ("[::1]:8765" -> "::1", "localhost:80" -> "localhost")."""
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(frozen=True)
class Refusal:
    """Why a request is not served: an HTTP status, a message for people, extra response headers."""

    status: HTTPStatus
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def status_code(self) -> int:
        return self.status.value


@dataclass
class Gate:
    """Decides, for each request, between a `Refusal` and letting it through to its route."""

    host: str
    token: str | None = None
    allowed_origins: frozenset[str] = frozenset()
    public_paths: frozenset[str] = frozenset()  # the page's static files

    def check(self, connection: HTTPConnection) -> Refusal | None:
        headers = connection.headers
        host_values, origin_values = headers.getlist("host"), headers.getlist("origin")
        if len(host_values) > 1 or len(origin_values) > 1:
            return Refusal(HTTPStatus.BAD_REQUEST, "repeated Host or Origin header")
        host_header = host_values[0] if host_values else ""
        origin = origin_values[0] if origin_values else None
        if not _HOST_HEADER.fullmatch(host_header):
            return Refusal(HTTPStatus.BAD_REQUEST, "missing or malformed Host header")
        public = connection.url.path in self.public_paths
        if self.token is not None and not public and not self._token_ok(headers, connection.url.query):
            return Refusal(HTTPStatus.UNAUTHORIZED,
                           "this dg-edit service needs a token: send 'Authorization: Bearer <token>' (the "
                           "api_key of OpenAI clients) or add ?token=<token> to the URL",
                           {"WWW-Authenticate": 'Bearer realm="dg-edit"'})
        if self.token is None and not self._host_ok(host_header):
            return Refusal(HTTPStatus.FORBIDDEN, f"unexpected Host header {host_header!r}: "
                                                 "use the address the service printed when it started")
        if not public and origin is not None and not self._origin_ok(origin, host_header):
            return Refusal(HTTPStatus.FORBIDDEN,
                           f"origin {origin!r} is not allowed; start the service with --allow-origin {origin}")
        return None

    def _token_ok(self, headers: Headers, query: str) -> bool:
        assert self.token is not None
        expected = self.token.encode()
        offered = []
        for value in headers.getlist("authorization"):
            scheme, _, credentials = value.partition(" ")
            if scheme.lower() == "bearer":
                offered.append(credentials.strip())
        offered.extend(parse_qs(query).get("token", []))
        # Check every offer, so the timing does not depend on which one matched.
        return sum(hmac.compare_digest(expected, o.encode()) for o in offered) > 0

    def _host_ok(self, host_header: str) -> bool:
        name = _split_host_header(host_header).lower()
        return name in LOOPBACK_NAMES or name == self.host.strip("[]").lower() or is_loopback(name)

    def _origin_ok(self, origin: str, host_header: str) -> bool:
        origin = origin.lower()
        # The page this server served: same scheme-less host:port as the request's Host header. Without
        # a token the Host header was already checked to be this machine (see `_host_ok`).
        own = {f"http://{host_header.lower()}", f"https://{host_header.lower()}"}
        return origin in own or origin in self.allowed_origins


# Renders a refusal for the route it was meant for (path -> response); see dg_edit.serve.errors.
RefusalRenderer = Callable[[str, Refusal], Response]


class GateMiddleware:
    """ASGI middleware: `Gate.check` before every HTTP request and websocket handshake."""

    def __init__(self, app: ASGIApp, gate: Gate, render: RefusalRenderer):
        self.app = app
        self.gate = gate
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.gate.check(HTTPConnection(scope))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        response = self.render(scope["path"], refusal)
        if scope["type"] == "http":
            await response(scope, receive, send)
        else:
            await deny_websocket(scope, receive, send, response)


async def deny_websocket(scope: Scope, receive: Receive, send: Send, response: Response) -> None:
    """Answer a websocket handshake with a plain HTTP response (ASGI's websocket.http.response)."""
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": response.status_code,
                    "headers": response.raw_headers})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:  # a server without the extension can only say 403
        await send({"type": "websocket.close", "code": 1008})


def plain_refusal(refusal: Refusal) -> Response:
    """A refusal as text/plain (the page, /healthz and the websocket: what they always answered)."""
    return Response(refusal.message + "\n", refusal.status_code, refusal.headers, media_type="text/plain; charset=utf-8")
