"""The HTTP APIs editor tools already speak, on the service's port: what they share.

Routes (dialects in `openai_api.py` and `llama_api.py`):

    POST /v1/completions        OpenAI completions; `prompt` + `suffix` is fill-in-the-middle
    POST /v1/chat/completions   OpenAI chat; an instructed rewrite when the request carries the code
    POST /infill                llama.cpp server's infill (llama.vim, llama.vscode)
    POST /next_edit             next-edit prediction (`next_edit_api.py`)
    GET  /v1/models             the one model served
    GET  /health, /v1/health    llama.cpp's health check (public, as there)

Every request: the gate (token, Host, Origin) -> 503 while the model loads -> the body, at most
`Settings.max_message_bytes` (413) -> the dialect's parser (400, in the dialect's error shape) ->
admission (429: `Settings.max_inflight` engine streams per client address, 64 on the service) ->
one engine stream per choice through `runner.run_job`, within `Settings.request_timeout_s`.
A client that disconnects cancels its streams before their next denoising step.

What a stream sends (`stream: true`): diffusion drafts rewrite themselves, while OpenAI and
llama.cpp clients append every delta they get. So the ordinary events carry committed text only:
a block's whole lines once the engine has moved on to the next canvas block (`Committer`), and the
rest when the request is done; an answer that fits one canvas (most completions) arrives in one
delta at the end. A client that wants to watch the canvas asks for `"drafts": true` and gets each
step's whole draft as an extra `event: draft` (OpenAI's SDKs do not skip named events, so drafts are
never sent unasked).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Protocol, Sequence

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..config import DOCUMENT_HEADER
from ..events import Done, Step
from .errors import ApiError, dialect, error_body, error_response
from .metrics import RequestMetrics
from .runner import Job, run_job

if TYPE_CHECKING:
    from .app import Service

log = logging.getLogger("dg_edit.serve")

OTHER_METHODS = ["GET", "HEAD", "PUT", "PATCH", "DELETE"]
MAX_DOCUMENT_CHARS = 256  # of the X-DG-Edit-Document header kept in a session key
MIN_TEMPERATURE_SCALE = 0.01  # temperature 0 ("as deterministic as possible"): the schedule scaled by this


# ---------------------------------------------------------------------------------------------- one request
@dataclass
class Outcome:
    """One choice's answer."""

    index: int
    text: str
    finish_reason: str  # "stop" (end of the middle, or a stop string) or "length" (the token budget)
    stopping_word: str = ""  # the stop string that ended it, if one did
    done: Done | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


class Format(Protocol):
    """How one dialect writes answers, whole or streamed."""

    api: str  # "openai" or "llama": the error shape
    done_marker: bool  # end a stream with `data: [DONE]`

    def response(self, outcomes: Sequence[Outcome], usage: Usage) -> dict: ...
    def stream_start(self) -> list[dict]: ...
    def stream_delta(self, index: int, text: str) -> dict: ...
    def stream_end(self, outcome: Outcome, usage: Usage | None) -> list[dict]: ...
    def stream_usage(self, usage: Usage) -> dict | None: ...


@dataclass
class Call:
    """A parsed HTTP request: the engine jobs (one per choice) and how to answer."""

    jobs: list[Job]
    format: Format
    stream: bool = False
    stop: tuple[str, ...] = ()
    drafts: bool = False
    max_new_tokens: int | None = None  # what `finish_reason: "length"` is measured against
    want_usage: bool = True  # count prompt tokens (a tokenizer pass) for usage/timings
    prompt_texts: tuple[str, ...] = ()  # what usage.prompt_tokens counts


class Committer:
    """The append-only text of one choice, from a stream of drafts that rewrite themselves.

    A block's text is final once the engine starts the next canvas block (a `Step` whose `total`,
    the step budget, moved on); only its whole lines are committed, since the tokens at the seam
    may still decode differently. Stop strings cut the text (and end the choice) wherever they
    appear; as many characters as the longest stop string, less one, are held back so that a stop
    string split across two commits is still found.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.sent = ""
        self.stopping_word = ""
        self.finished = False
        self._last: Step | None = None
        self._done: Done | None = None

    def step(self, step: Step) -> str:
        last, self._last = self._last, step
        if last is None or step.total == last.total:
            return ""
        return self._offer(last.text, final=False)

    def done(self, done: Done) -> str:
        self._done = done
        return self._offer(done.text, final=True)

    def outcome(self, index: int, budget: int) -> Outcome:
        if self.stopping_word:
            reason = "stop"
        else:
            reason = "length" if self._done is not None and len(self._done.ids) >= budget else "stop"
        return Outcome(index, self.sent, reason, self.stopping_word, self._done)

    def _offer(self, text: str, final: bool) -> str:
        cut = min(((i, s) for s in self.stop if (i := text.find(s)) >= 0), default=None)
        if cut is not None:
            text, self.stopping_word, final = text[:cut[0]], cut[1], True
        if not final:
            text = text[: text.rfind("\n") + 1]
            text = text[: max(len(self.sent), len(text) - self.hold)]
        self.finished = final
        if not text.startswith(self.sent):  # a committed block decoded differently at the end: keep what was sent
            log.warning("final text does not extend the committed text; the rest is dropped")
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def temperature_sampling(engine, temperature: float | None) -> dict[str, float]:
    """OpenAI/llama.cpp `temperature` as DiffusionGemma's schedule: both ends of the engine's own
    t_max -> t_min schedule scaled by it (1 keeps the model's schedule; 0, and llama.cpp's negative
    values, scale it by MIN_TEMPERATURE_SCALE: as deterministic as the sampler gets)."""
    if temperature is None:
        return {}
    scale = max(float(temperature), MIN_TEMPERATURE_SCALE)
    return {"t_max": engine.sampling.t_max * scale, "t_min": engine.sampling.t_min * scale}


# ---------------------------------------------------------------------------------------------- field checks
class Fields:
    """Type-checked reads from a JSON body; every mistake is a 400 naming the field."""

    def __init__(self, data: Any):
        if not isinstance(data, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object", "invalid_request")
        self.data = data

    def unknown(self, known: Sequence[str]) -> list[str]:
        return sorted(set(self.data) - set(known))

    def get(self, name: str, kinds: tuple[type, ...], default: Any = None, *, nullable: bool = True) -> Any:
        value = self.data.get(name, default)
        if value is None and nullable:
            return default
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "an array",
                     dict: "an object"}
            raise bad_value(name, f"{name} must be {' or '.join(names[k] for k in kinds)}, got {_short(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise bad_value(name, f"{name} must be a finite number")
        return value

    def strings(self, name: str, *, max_items: int | None = None) -> tuple[str, ...]:
        """A string or an array of strings (OpenAI's `stop`)."""
        value = self.data.get(name)
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise bad_value(name, f"{name} must be a string or an array of strings")
        if max_items is not None and len(items) > max_items:
            raise bad_value(name, f"{name} takes at most {max_items} strings, got {len(items)}")
        return tuple(items)


def bad_value(param: str, message: str) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message, "invalid_value", param=param)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- the routes
class HttpApi:
    """The HTTP routes of one `Service`: admission, running calls, answering whole or streamed."""

    def __init__(self, service: "Service"):
        self.service = service
        self.running: Counter[str] = Counter()  # engine streams per client address

    def routes(self) -> list[Route]:
        from . import llama_api, next_edit_api, openai_api

        return [
            Route(next_edit_api.PATH, next_edit_api.NextEditRoute(self).endpoint, methods=["POST"]),
            Route("/v1/completions", self._post(openai_api.parse_completion, "openai"), methods=["POST"]),
            Route("/v1/chat/completions", self._post(openai_api.parse_chat, "openai"), methods=["POST"]),
            Route("/infill", self._post(llama_api.parse_infill, "llama"), methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
            Route("/v1/health", self._health, methods=["GET"]),
            # Anything else under the APIs: 404/405 in the API's own shape, not the page's text.
            Route("/v1/{rest:path}", self._no_route, methods=OTHER_METHODS + ["POST"]),
            Route("/infill", self._no_route, methods=OTHER_METHODS),
            Route(next_edit_api.PATH, self._no_route, methods=OTHER_METHODS),
        ]

    async def _no_route(self, request: Request) -> Response:
        path = request.url.path
        allowed = {"/v1/completions": "POST", "/v1/chat/completions": "POST", "/infill": "POST",
                   "/v1/models": "GET", "/v1/health": "GET", "/next_edit": "POST"}.get(path)
        if allowed is None:
            error = ApiError(HTTPStatus.NOT_FOUND, f"no route {path}: this server has /v1/completions, "
                                                   "/v1/chat/completions, /v1/models, /infill and /next_edit",
                             "not_found")
        else:
            error = ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes {allowed}, not {request.method}",
                             "method_not_allowed", headers={"Allow": allowed})
        return error_response(error, dialect(path))

    def inflight(self) -> int:
        return sum(self.running.values())

    # ------------------------------------------------------------------ GET routes
    async def _models(self, request: Request) -> Response:
        try:
            self._ready()
        except ApiError as e:
            return error_response(e, "openai")
        info = self.service.model_info
        return JSONResponse({"object": "list", "data": [{
            "id": self.service.model_id, "object": "model", "created": int(self.service.started_at),
            "owned_by": "dg-edit", "meta": {k: info.get(k) for k in ("parameters", "device", "dtype", "canvas_length")},
        }]})

    async def _health(self, request: Request) -> Response:
        if self.service.engine is None:  # llama.cpp's own words and shape
            return JSONResponse({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
                                HTTPStatus.SERVICE_UNAVAILABLE)
        return JSONResponse({"status": "ok"})

    # ------------------------------------------------------------------ POST routes
    def _post(self, parse: Callable[..., Call], api: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            track = self.service.metrics.request(request.url.path)
            try:
                self._ready()
                body = await self._body(request)
                client = request.client.host if request.client else "-"
                call = parse(body, self.service, session_client(request, client))
                self._admit(client, len(call.jobs))
            except ApiError as e:
                track.error(e.code)
                return error_response(e, api)
            except ClientDisconnect:
                track.cancelled()
                return Response(status_code=499)  # nobody reads it
            return await self._answer(request, call, client, track)

        return endpoint

    def _ready(self) -> None:
        if self.service.engine is None:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading; try again in a few seconds",
                           "model_loading", headers={"Retry-After": "5"})

    async def _body(self, request: Request) -> Any:
        limit = self.service.settings.max_message_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the request body is not JSON: {e}", "invalid_json") from None

    def _admit(self, client: str, n: int) -> None:
        limit = self.service.settings.max_inflight
        if self.running[client] + n > limit:
            raise ApiError(HTTPStatus.TOO_MANY_REQUESTS,
                           f"{self.running[client]} requests from {client} are running and this one needs {n} more "
                           f"(max_inflight={limit} per client); wait for one to finish or cancel one", "busy",
                           headers={"Retry-After": "1"})
        refusal = self.service.service_busy(n)
        if refusal is not None:
            raise ApiError(HTTPStatus.TOO_MANY_REQUESTS, refusal, "busy", headers={"Retry-After": "1"})
        self.running[client] += n

    def _release(self, client: str, n: int) -> None:
        self.running[client] -= n
        if self.running[client] <= 0:
            del self.running[client]

    # ------------------------------------------------------------------ running a call
    async def _answer(self, request: Request, call: Call, client: str, track: RequestMetrics) -> Response:
        run = _Run(self.service, call)
        watcher = asyncio.ensure_future(_disconnected(request))
        handed_over = False
        try:
            if not call.jobs:  # nothing to generate (max_tokens / n_predict 0)
                outcomes = []
            else:
                # The first event settles the status: the engine refuses bad input before any step.
                first = await _race(run.next(), watcher)
                if call.stream:
                    watcher.cancel()  # from here Starlette's StreamingResponse watches the connection
                    handed_over = True
                    return StreamingResponse(self._sse(run, first, client, track), media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                outcomes = await _race(run.collect(first), watcher)
            usage = await self._usage(call, outcomes)
            track.ok(_dones(outcomes))
            if call.stream:  # an empty stream: no engine call was needed
                return StreamingResponse(self._sse_empty(call, usage), media_type="text/event-stream")
            return JSONResponse(call.format.response(outcomes, usage))
        except ApiError as e:
            track.error(e.code)
            return error_response(e, call.format.api)
        except _Gone:
            track.cancelled()
            return Response(status_code=499)
        finally:
            watcher.cancel()
            if not handed_over:
                track.error("server_error")  # only if nothing above counted it: an unexpected failure (500)
                run.close()
                self._release(client, len(call.jobs))

    async def _sse(self, run: "_Run", first: tuple, client: str, track: RequestMetrics) -> AsyncIterator[str]:
        call = run.call
        fmt = call.format
        try:
            for chunk in fmt.stream_start():
                yield _event(chunk)
            item: tuple | None = first
            outcomes: list[Outcome] = []
            while item is not None:
                kind, index, value = item
                if kind == "draft":
                    yield _event({"index": index, "step": value.index, "total": value.total, "text": value.text},
                                 name="draft")
                elif kind == "delta":
                    yield _event(fmt.stream_delta(index, value))
                else:  # "end"
                    outcomes.append(value)
                    if len(outcomes) < len(call.jobs):
                        for chunk in fmt.stream_end(value, None):
                            yield _event(chunk)
                item = await run.next() if len(outcomes) < len(call.jobs) else None
            usage = await self._usage(call, outcomes)
            track.ok(_dones(outcomes))
            for event in _stream_tail(fmt, outcomes[-1], usage):
                yield event
        except ApiError as e:
            track.error(e.code)
            yield _event(error_body(e, fmt.api))  # both SDK families read an error object from data
        finally:
            track.cancelled()  # only if nothing above counted it: the client left mid-stream
            run.close()  # no await: this may run while the response task is being cancelled
            self._release(client, len(call.jobs))

    async def _sse_empty(self, call: Call, usage: Usage) -> AsyncIterator[str]:
        """The stream of a call that needed no engine (nothing to generate)."""
        for chunk in call.format.stream_start():
            yield _event(chunk)
        for event in _stream_tail(call.format, Outcome(0, "", "length"), usage):
            yield event

    async def _usage(self, call: Call, outcomes: Sequence[Outcome]) -> Usage:
        completion = sum(len(o.done.ids) if o.done is not None else 0 for o in outcomes)
        if not call.want_usage or not call.prompt_texts:
            return Usage(0, completion)
        engine = self.service.engine
        tokenizer = getattr(engine, "tokenizer", None)
        if tokenizer is None:
            return Usage(0, completion)
        texts = [t for t in call.prompt_texts if t]
        count = await asyncio.get_running_loop().run_in_executor(
            self.service.executor, lambda: sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]))
        return Usage(count, completion)


class _Gone(Exception):
    """The client disconnected."""


class _Run:
    """The engine streams of one call, merged into one queue of (kind, choice index, value)."""

    def __init__(self, service: "Service", call: Call):
        self.service = service
        self.call = call
        self.queue: asyncio.Queue = asyncio.Queue()
        self.deadline = asyncio.get_running_loop().time() + service.settings.request_timeout_s
        self.cancels = [threading.Event() for _ in call.jobs]
        self.tasks = [asyncio.create_task(self._choice(i, job)) for i, job in enumerate(call.jobs)]
        self._ended = 0

    async def _choice(self, index: int, job: Job) -> None:
        call = self.call
        committer = Committer(call.stop)
        budget = call.max_new_tokens or self.service.settings.max_new_tokens
        try:
            events = run_job(self.service.engine, job, cancel=self.cancels[index], executor=self.service.executor)
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Step):
                        if call.drafts:
                            self.queue.put_nowait(("draft", index, event))
                        delta = committer.step(event)
                    else:
                        delta = committer.done(event)
                    if delta:
                        self.queue.put_nowait(("delta", index, delta))
                    if committer.finished:
                        break  # done, or a stop string: leaving the stream stops the engine
            self.queue.put_nowait(("end", index, committer.outcome(index, budget)))
        except ValueError as e:  # the engine refused the input
            self.queue.put_nowait(("error", index, bad_value("prompt", str(e))))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a model failure: this request fails, the service goes on
            log.exception("HTTP request failed in the engine")
            self.queue.put_nowait(("error", index, ApiError(HTTPStatus.INTERNAL_SERVER_ERROR,
                                                            f"the model failed: {type(e).__name__}: {e}",
                                                            "model_error")))

    async def next(self) -> tuple:
        """The next event; raises the call's `ApiError` (a failed choice, or request_timeout_s)."""
        try:
            async with asyncio.timeout_at(self.deadline):
                item = await self.queue.get()
        except TimeoutError:
            limit = self.service.settings.request_timeout_s
            raise ApiError(HTTPStatus.GATEWAY_TIMEOUT, f"request ran longer than request_timeout_s={limit:g} s and was "
                                                       "stopped", "timeout") from None
        if item[0] == "error":
            raise item[2]
        return item

    async def collect(self, first: tuple) -> list[Outcome]:
        outcomes: list[Outcome] = []
        item = first
        while True:
            if item[0] == "end":
                outcomes.append(item[2])
                if len(outcomes) == len(self.call.jobs):
                    return sorted(outcomes, key=lambda o: o.index)
            item = await self.next()

    def close(self) -> None:
        for cancel in self.cancels:
            cancel.set()
        for task in self.tasks:
            task.cancel()


def _dones(outcomes: Sequence[Outcome]) -> list[Done]:
    return [o.done for o in outcomes if o.done is not None]


def session_client(request: Request, client: str) -> str:
    """Who a request's prefix-cache session belongs to: the client address, and the document it names
    (`X-DG-Edit-Document`), so that one editor working on two documents keeps a warm cache for each."""
    document = request.headers.get(DOCUMENT_HEADER, "")[:MAX_DOCUMENT_CHARS]
    return f"{client}:{document}" if document else client


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is already read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _race(work, watcher: asyncio.Future):
    """`work`'s result, or `_Gone` as soon as the client disconnects (then `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        return task.result()
    task.cancel()
    raise _Gone()


def _stream_tail(fmt: Format, last: Outcome, usage: Usage) -> list[str]:
    """The end of a stream: the last choice's finish, usage (when asked for), `[DONE]` (OpenAI)."""
    events = [_event(chunk) for chunk in fmt.stream_end(last, usage)]
    tail = fmt.stream_usage(usage)
    if tail is not None:
        events.append(_event(tail))
    if fmt.done_marker:
        events.append("data: [DONE]\n\n")
    return events


def _event(data: dict, name: str | None = None) -> str:
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return (f"event: {name}\n" if name else "") + f"data: {body}\n\n"


def _too_large(limit: int) -> ApiError:
    return ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"the request body is larger than max_message_bytes={limit}", "body_too_large")


def now() -> int:
    return int(time.time())

