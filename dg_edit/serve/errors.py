"""Errors of the HTTP APIs, each in the shape its clients parse.

- OpenAI (`/v1/...`): `{"error": {"message", "type", "param", "code"}}`; the OpenAI SDKs raise
  `BadRequestError`, `AuthenticationError`, `PermissionDeniedError`, `RateLimitError`, ... by status.
- llama.cpp (`/infill`, `/health`): `{"error": {"code": <status>, "message", "type"}}`, with the
  types of llama.cpp's server (`invalid_request_error`, `authentication_error`, `unavailable_error`...).
- Everything else (the page, /healthz, the websocket handshake): text/plain, as it always was.

The gate's refusals (401/403/400) go through `render_refusal`, so an OpenAI client with a wrong
api_key gets an OpenAI-shaped 401, and llama.vim a llama.cpp-shaped one.
"""

from __future__ import annotations

from http import HTTPStatus

from starlette.responses import JSONResponse, Response

from .gate import Refusal, plain_refusal

LLAMA_PATHS = ("/infill", "/health", "/v1/health")

_OPENAI_TYPES = {
    HTTPStatus.UNAUTHORIZED: "authentication_error",
    HTTPStatus.FORBIDDEN: "permission_error",
    HTTPStatus.NOT_FOUND: "invalid_request_error",
    HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
}
_LLAMA_TYPES = {
    HTTPStatus.UNAUTHORIZED: "authentication_error",
    HTTPStatus.FORBIDDEN: "permission_error",
    HTTPStatus.NOT_FOUND: "not_found_error",
    HTTPStatus.TOO_MANY_REQUESTS: "unavailable_error",
    HTTPStatus.SERVICE_UNAVAILABLE: "unavailable_error",
}


class ApiError(Exception):
    """A request the HTTP APIs cannot serve: status, message, and a machine-readable code."""

    def __init__(self, status: HTTPStatus, message: str, code: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None):
        # Messages quote the client's own field names and values, which may hold lone surrogates
        # ("\udfff" in JSON): those cannot be encoded as UTF-8, so they are written out as escapes.
        message = _printable(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = None if param is None else _printable(param)
        self.headers = headers or {}


def _printable(text: str) -> str:
    """`text` as valid UTF-8: characters that cannot be encoded (lone surrogates) become backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def dialect(path: str) -> str:
    """Which API a path belongs to: "openai", "llama" or "plain"."""
    if path in LLAMA_PATHS:
        return "llama"
    return "openai" if path.startswith("/v1/") else "plain"


def error_body(error: ApiError, api: str) -> dict:
    """The JSON error object of `api` ("openai" or "llama"), also sent as a server-sent event mid-stream."""
    if api == "llama":
        return {"error": {"code": error.status.value, "message": error.message,
                          "type": _LLAMA_TYPES.get(error.status, "invalid_request_error" if error.status < 500
                                                   else "server_error")}}
    return {"error": {"message": error.message,
                      "type": _OPENAI_TYPES.get(error.status, "invalid_request_error" if error.status < 500
                                                else "server_error"),
                      "param": error.param, "code": error.code}}


def error_response(error: ApiError, api: str) -> Response:
    return JSONResponse(error_body(error, api), error.status.value, headers=error.headers)


_REFUSAL_CODES = {HTTPStatus.UNAUTHORIZED: "invalid_api_key", HTTPStatus.FORBIDDEN: "forbidden",
                  HTTPStatus.BAD_REQUEST: "bad_request"}


def render_refusal(path: str, refusal: Refusal) -> Response:
    """A gate refusal in the shape of the route's API (plain text outside the HTTP APIs)."""
    api = dialect(path)
    if api == "plain":
        return plain_refusal(refusal)
    error = ApiError(refusal.status, refusal.message, _REFUSAL_CODES.get(refusal.status, "refused"),
                     headers=refusal.headers)
    return error_response(error, api)
