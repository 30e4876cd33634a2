"""`POST /next_edit`: next-edit prediction over HTTP, for tools that keep no websocket open.

Request body (JSON):

    text      the whole document (required)
    cursor    character offset into text (required)
    edits     the recent edits, oldest first, each {start, end, text, old_text?} indexing the text
              before it (HTTP keeps no history between calls: the client sends what it has; [] or
              absent: none)
    session   document key for the warm encoder cache (scoped to the client's address)
    seed      default 0 (a suggestion is reproducible)
    extra     chunks of other files, [{"text", "filename"?}]
    stream    true: server-sent `event: step` drafts ({step, total, text}) then `event: done`

Answer: the websocket `done` frame's fields, without `type` and `id`: `edits` (character offsets
into `text`, in text order, each with `score`; empty when the model keeps the window), `window`
([start, end) rewritten), `text` (the window's rewrite), `steps`, `tokens_per_forward`, `ms`.
Errors: 400 naming the field, 413, 429, 503, 504, in the OpenAI error shape (as every non-llama.cpp
route of the service).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, AsyncIterator

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..edits import TextEdit
from ..events import Done, Step
from .errors import ApiError, error_body, error_response
from .http_api import Fields, bad_value, session_client
from .metrics import RequestMetrics
from .protocol import ProtocolError, parse_extra
from .runner import Job, run_job

if TYPE_CHECKING:
    from .http_api import HttpApi

PATH = "/next_edit"
FIELDS = ("text", "cursor", "edits", "session", "seed", "extra", "stream")


def parse(data: Any, client: str) -> tuple[Job, bool]:
    """The body as a `next_edit` job, and whether to stream; `ApiError` (400) names the field at fault."""
    body = Fields(data)
    unknown = body.unknown(FIELDS)
    if unknown:
        raise bad_value(unknown[0], f"unknown field(s): {', '.join(unknown)}; accepted: {', '.join(FIELDS)}")
    if "text" not in data or "cursor" not in data:
        missing = "text" if "text" not in data else "cursor"
        raise bad_value(missing, f"{PATH} needs {missing!r}")
    text = body.get("text", (str,), nullable=False)
    cursor = body.get("cursor", (int,), nullable=False)
    if not 0 <= cursor <= len(text):
        raise bad_value("cursor", f"cursor must be a character offset in [0, {len(text)}], got {cursor}")
    edits = []
    for i, item in enumerate(body.get("edits", (list,), [])):
        try:
            edits.append(TextEdit.from_json(item))
        except ValueError as e:
            raise bad_value("edits", f"edits[{i}]: {e}") from None
    seed = body.get("seed", (int,), None)
    if seed is not None and not 0 <= seed < 2 ** 64:
        raise bad_value("seed", f"seed must be an integer in [0, 2**64), got {seed}")
    try:
        extra = parse_extra(body.get("extra", (list,), []))
    except ProtocolError as e:
        raise bad_value("extra", e.message) from None
    session = body.get("session", (str,), None)
    job = Job("next_edit", text, cursor=cursor, seed=seed, extra=extra, edits=tuple(edits),
              session=f"http:{client}:{session}" if session is not None else None)
    return job, body.get("stream", (bool,), False)


def done_body(done: Done) -> dict:
    body = done.to_json()
    body.pop("type")
    return body


class NextEditRoute:
    """The route on one service's `HttpApi` (its admission and limits)."""

    def __init__(self, http: "HttpApi"):
        self.http = http

    async def endpoint(self, request: Request) -> Response:
        http = self.http
        client = request.client.host if request.client else "-"
        track = http.service.metrics.request(PATH)
        try:
            http._ready()
            job, stream = parse(await http._body(request), session_client(request, client))
            http._admit(client, 1)
        except ApiError as e:
            track.error(e.code)
            return error_response(e, "openai")
        except ClientDisconnect:
            track.cancelled()
            return Response(status_code=499)
        cancel = threading.Event()
        deadline = asyncio.get_running_loop().time() + http.service.settings.request_timeout_s
        events = run_job(http.service.engine, job, cancel=cancel, executor=http.service.executor)
        try:
            first = await self._next(events, deadline)  # bad input is refused before any step: a 400, not a stream
        except ApiError as e:
            track.error(e.code)
            cancel.set()
            await events.aclose()
            http._release(client, 1)
            return error_response(e, "openai")
        if stream:
            return StreamingResponse(self._sse(events, first, cancel, client, deadline, track),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            event = first
            while not isinstance(event, Done):
                event = await self._next(events, deadline)
            track.ok([event])
            return JSONResponse(done_body(event))
        except ApiError as e:
            track.error(e.code)
            return error_response(e, "openai")
        finally:
            track.cancelled()  # only if nothing above counted it
            cancel.set()
            await events.aclose()
            http._release(client, 1)

    async def _next(self, events: AsyncIterator[Step | Done], deadline: float) -> Step | Done:
        limit = self.http.service.settings.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                return await anext(events)
        except TimeoutError:
            raise ApiError(HTTPStatus.GATEWAY_TIMEOUT, f"request ran longer than request_timeout_s={limit:g} s and "
                                                       "was stopped", "timeout") from None
        except StopAsyncIteration:
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, "the engine ended without an answer", "model_error") from None
        except ValueError as e:  # the engine refused the input
            raise bad_value("text", str(e)) from None
        except Exception as e:  # a model failure: this request fails, the service goes on
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"the model failed: {type(e).__name__}: {e}",
                           "model_error") from None

    async def _sse(self, events, first: Step | Done, cancel: threading.Event, client: str,
                   deadline: float, track: RequestMetrics) -> AsyncIterator[str]:
        try:
            event = first
            while True:
                if isinstance(event, Done):
                    track.ok([event])
                    yield _event("done", done_body(event))
                    return
                yield _event("step", {"step": event.index, "total": event.total, "text": event.text})
                event = await self._next(events, deadline)
        except ApiError as e:
            track.error(e.code)
            yield _event("error", error_body(e, "openai"))
        finally:
            track.cancelled()  # only if nothing above counted it: the client left mid-stream
            cancel.set()
            with contextlib.suppress(RuntimeError):  # closed while the response task is being cancelled
                await events.aclose()
            self.http._release(client, 1)


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"
