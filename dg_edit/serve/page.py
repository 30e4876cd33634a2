"""The demo page (`GET /`, package data `dg_edit/web/*`): a plain editor driving the websocket.

Served with a Content-Security-Policy that only allows the page's own scripts and its websocket,
`nosniff`, no caching and no referrer (the page URL may carry `?token=`).
"""

from __future__ import annotations

from http import HTTPStatus
from importlib import resources
from pathlib import Path

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from .gate import WS_PATH

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}
SAFE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def web_dir() -> Path:
    """The demo page's files (package data `dg_edit/web/*`)."""
    return Path(str(resources.files("dg_edit"))) / "web"


def page_files() -> dict[str, Path]:
    """URL path -> file, for every file of the page ("/" is index.html)."""
    files = {f"/{p.name}": p for p in web_dir().iterdir() if p.suffix in _CONTENT_TYPES}
    if "/index.html" in files:
        files["/"] = files["/index.html"]
    return files


class Page:
    """The page's static files as one route handler; unknown paths get a 404 that says where things are."""

    def __init__(self, files: dict[str, Path] | None = None):
        self.files = files if files is not None else page_files()

    async def respond(self, request: Request) -> Response:
        path = self.files.get(request.url.path)
        if path is None:
            return PlainTextResponse(f"not found: {request.url.path} (the page is at /, the websocket at {WS_PATH}, "
                                     "the HTTP APIs under /v1 and at /infill and /next_edit)\n", HTTPStatus.NOT_FOUND,
                                     headers=SAFE_HEADERS)
        headers = dict(SAFE_HEADERS)
        if path.suffix == ".html":
            headers["Content-Security-Policy"] = csp(request.headers.get("host", ""))
        return Response(path.read_bytes(), headers=headers, media_type=_CONTENT_TYPES[path.suffix])


def csp(host_header: str) -> str:
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
            f"connect-src 'self' ws://{host_header} wss://{host_header}; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
