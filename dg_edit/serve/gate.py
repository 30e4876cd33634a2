"""The HTTP side of `dg-edit serve`: who may connect, and the few plain HTTP answers.

Every request, websocket upgrade or not, passes `Gate.check` first (websockets calls it as
`process_request`):

1. Token. With a token configured, the websocket and /healthz need `Authorization: Bearer T` or
   `?token=T` (browsers cannot set headers on a websocket); otherwise 401. Compared with
   `hmac.compare_digest` so the answer time does not leak how much of a guess was right. The page's
   own static files are public (they hold no secrets, and a browser fetches them without the
   token); the page reads the token from its own URL (`/?token=T`).
2. Host (only without a token). A page the user happens to visit can point its own host name at
   127.0.0.1 (DNS rebinding); refusing unknown `Host` headers stops it reading /healthz or the page.
3. Origin, on the websocket endpoint only. Browsers always send `Origin`; the server's own page, the
   `--allow-origin` list, and clients without an `Origin` header (scripts, editors: they are not a
   web page the user happens to visit) are allowed; anything else gets 403.

Then `GET /` serves the demo page (with a Content-Security-Policy that only allows the page's own
scripts and its websocket), `GET /healthz` the service's JSON status, and `/ws` goes on to the
websocket handshake.
"""

from __future__ import annotations

import email.utils
import hmac
import ipaddress
import json
import re
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Request, Response

WS_PATH = "/ws"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_HOST_HEADER = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]+)?|\[[0-9A-Fa-f:.]+\](:[0-9]+)?")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}


def web_dir() -> Path:
    """The demo page's files (package data `dg_edit/web/*`)."""
    return Path(str(resources.files("dg_edit"))) / "web"


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


@dataclass
class Gate:
    """Decides, for each HTTP request, between an answer (page, status, 401/403/404) and the handshake."""

    host: str
    token: str | None = None
    allowed_origins: frozenset[str] = frozenset()
    health: Callable[[], dict[str, Any]] = dict
    files: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.files:
            root = web_dir()
            self.files = {f"/{p.name}": p for p in root.iterdir() if p.suffix in _CONTENT_TYPES}
            if "/index.html" in self.files:
                self.files["/"] = self.files["/index.html"]

    # websockets' process_request hook
    def check(self, connection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        try:
            host_header = request.headers.get("Host", "")
            origin = request.headers.get("Origin")
        except MultipleValuesError:
            return _text(HTTPStatus.BAD_REQUEST, "repeated Host or Origin header\n")
        if not _HOST_HEADER.fullmatch(host_header):
            return _text(HTTPStatus.BAD_REQUEST, "missing or malformed Host header\n")
        static = self.files.get(url.path)  # the page's own files: public, no secrets in them
        if self.token is not None and static is None and not self._token_ok(request.headers, url.query):
            response = _text(HTTPStatus.UNAUTHORIZED,
                             "this dg-edit service needs a token: send 'Authorization: Bearer <token>' "
                             "or add ?token=<token> to the URL\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="dg-edit"'
            return response
        if self.token is None and not self._host_ok(host_header):
            return _text(HTTPStatus.FORBIDDEN, f"unexpected Host header {host_header!r}: "
                                               "use the address the service printed when it started\n")
        if url.path == WS_PATH:
            if origin is not None and not self._origin_ok(origin, host_header):
                return _text(HTTPStatus.FORBIDDEN,
                             f"origin {origin!r} is not allowed; start the service with --allow-origin {origin}\n")
            return None  # go on with the websocket handshake
        if url.path == "/healthz":
            return _respond(HTTPStatus.OK, json.dumps(self.health()).encode(), "application/json")
        path = static
        if path is None:
            return _text(HTTPStatus.NOT_FOUND, f"not found: {url.path} (the page is at /, the websocket at "
                                               f"{WS_PATH})\n")
        response = _respond(HTTPStatus.OK, path.read_bytes(), _CONTENT_TYPES[path.suffix])
        if path.suffix == ".html":
            response.headers["Content-Security-Policy"] = self._csp(host_header)
        return response

    def _token_ok(self, headers: Headers, query: str) -> bool:
        assert self.token is not None
        expected = self.token.encode()
        offered = []
        for value in headers.get_all("Authorization"):
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

    def _csp(self, host_header: str) -> str:
        return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                f"connect-src 'self' ws://{host_header} wss://{host_header}; base-uri 'none'; form-action 'none'; "
                "frame-ancestors 'none'")


def _respond(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Length", str(len(body))),
        ("Content-Type", content_type),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),  # the page URL may carry ?token=
    ])
    return Response(status.value, status.phrase, headers, body)


def _text(status: HTTPStatus, text: str) -> Response:
    return _respond(status, text.encode(), "text/plain; charset=utf-8")
