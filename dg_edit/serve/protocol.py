"""The websocket protocol: client frames in, typed requests out; core events in, server frames out.

Why a module of its own: the service, its tests, the benchmark and any Python client share one
parser and one frame builder, so a field name is spelled in exactly one place (plus the JSON Schema
in `dg_edit/schema/protocol.schema.json`, which the tests check against this code).

Server frames are the core's own events (`Step`, `Done`, `Error`) through their `to_json()`, tagged
with the request id; the only frame without a core event is `cancelled`, which is a fact about the
connection rather than about the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..events import Done, Error, Step
from ..extra import extra_chunk

MAX_ID_CHARS = 128

# Error codes a client can see; `code` of an `error` frame is always one of these.
BAD_REQUEST = "bad_request"  # not JSON, unknown type, missing/wrongly typed fields, input the engine refused
DUPLICATE_ID = "duplicate_id"  # the id is already in flight on this connection (that request keeps running)
UNKNOWN_ID = "unknown_id"  # cancel for an id that is not in flight (never sent, or already finished)
BUSY = "busy"  # max_inflight requests already running on this connection
TIMEOUT = "timeout"  # the request ran longer than request_timeout_s and was stopped
MODEL_ERROR = "model_error"  # the engine failed; the server log has the traceback
ERROR_CODES = (BAD_REQUEST, DUPLICATE_ID, UNKNOWN_ID, BUSY, TIMEOUT, MODEL_ERROR)


class ProtocolError(ValueError):
    """A client frame that cannot be served; becomes an `error` frame with `code` and the request `id`."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class InfillRequest:
    """Fill the middle between `prefix` and `suffix` (the cursor sits between them)."""

    id: str
    prefix: str
    suffix: str = ""
    max_new_tokens: int | None = None
    seed: int | None = None
    session: str | None = None  # prefix-cache key (e.g. the document name), scoped to the connection
    single_line: bool | None = None  # None: the engine decides from the cursor's line
    extra: tuple[str, ...] = ()  # chunks of other files, as `dg_edit.extra.extra_chunk` writes them


@dataclass(frozen=True)
class RewriteRequest:
    """Re-denoise `selection` in place between `prefix` and `suffix`."""

    id: str
    prefix: str
    selection: str
    suffix: str = ""
    instruction: str | None = None
    strength: float = 0.6
    seed: int | None = None
    session: str | None = None
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class NextEditRequest:
    """Suggest the edit the user will make next near `cursor` (a character offset into `text`)."""

    id: str
    text: str
    cursor: int
    seed: int | None = None
    session: str | None = None  # the document: its edit history (`edit` frames) and warm caches
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class EditMessage:
    """The user edited document `session`: replace `[start, end)` (character offsets into the text before
    the edit, which read `old_text`) with `text`. Feeds the document's edit history, which aims
    `next_edit` requests. With `document` (the whole text after the edit) and `cursor`, the service
    also prepares the next-edit suggestion there while the connection is quiet. Answered only when
    refused (an `error` frame)."""

    id: str
    session: str
    start: int
    end: int
    text: str
    old_text: str = ""
    document: str | None = None
    cursor: int | None = None


@dataclass(frozen=True)
class CancelRequest:
    """Stop the in-flight request `id`; the server answers `cancelled` (or `unknown_id`)."""

    id: str


Request = InfillRequest | RewriteRequest | NextEditRequest | EditMessage | CancelRequest

# field -> (python type(s), required); "id" and "type" are checked for every frame first.
_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "infill": {
        "prefix": ((str,), True),
        "suffix": ((str,), False),
        "max_new_tokens": ((int,), False),
        "seed": ((int,), False),
        "session": ((str,), False),
        "single_line": ((bool,), False),
        "extra": ((list,), False),
    },
    "rewrite": {
        "prefix": ((str,), True),
        "selection": ((str,), True),
        "suffix": ((str,), False),
        "instruction": ((str,), False),
        "strength": ((int, float), False),
        "seed": ((int,), False),
        "session": ((str,), False),
        "extra": ((list,), False),
    },
    "next_edit": {
        "text": ((str,), True),
        "cursor": ((int,), True),
        "seed": ((int,), False),
        "session": ((str,), False),
        "extra": ((list,), False),
    },
    "edit": {
        "session": ((str,), True),
        "start": ((int,), True),
        "end": ((int,), True),
        "text": ((str,), True),
        "old_text": ((str,), False),
        "document": ((str,), False),
        "cursor": ((int,), False),
    },
    "cancel": {},
}
_CLASSES = {"infill": InfillRequest, "rewrite": RewriteRequest, "next_edit": NextEditRequest, "edit": EditMessage,
            "cancel": CancelRequest}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "an array"}


def parse_request(message: str | bytes) -> Request:
    """One client frame to a typed request; raises `ProtocolError` (code `bad_request`) otherwise.

    Binary frames are refused rather than decoded, so that a client bug (sending bytes) is reported
    instead of half-working. Unknown fields are errors, as everywhere in dg-edit: a misspelt
    `max_new_token` must not be silently ignored.
    """
    if isinstance(message, (bytes, bytearray, memoryview)):
        raise ProtocolError(BAD_REQUEST, "binary frames are not accepted: send JSON as a text frame")
    try:
        data = json.loads(message)
    except json.JSONDecodeError as e:
        raise ProtocolError(BAD_REQUEST, f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise ProtocolError(BAD_REQUEST, f"a request must be a JSON object, got {_json_kind(data)}")
    request_id = data.get("id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_CHARS:
        raise ProtocolError(BAD_REQUEST, f"id must be a non-empty string of at most {MAX_ID_CHARS} characters, "
                                         f"got {_short(request_id)}")
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise ProtocolError(BAD_REQUEST, f"unknown request type {_short(kind)}; expected one of "
                                         f"{', '.join(sorted(_FIELDS))}", request_id)
    spec = _FIELDS[kind]
    unknown = sorted(set(data) - set(spec) - {"type", "id"})
    if unknown:
        raise ProtocolError(BAD_REQUEST, f"unknown field(s) for {kind}: {', '.join(unknown)}; accepted: "
                                         f"{', '.join(['type', 'id', *spec])}", request_id)
    values: dict[str, Any] = {"id": request_id}
    for name, (types, required) in spec.items():
        if name not in data:
            if required:
                raise ProtocolError(BAD_REQUEST, f"{kind} needs field {name!r}", request_id)
            continue
        value = data[name]
        if not _is_instance(value, types):
            raise ProtocolError(BAD_REQUEST, f"{name} must be {_TYPE_NAMES[types[-1]]}, got {_short(value)}",
                                request_id)
        values[name] = value
    _check_ranges(values, request_id)
    if kind == "edit" and ("document" in values) != ("cursor" in values):
        raise ProtocolError(BAD_REQUEST, "an edit's document and cursor come together (both or neither)", request_id)
    if "extra" in values:
        values["extra"] = parse_extra(values["extra"], request_id)
    return _CLASSES[kind](**values)


def _check_ranges(values: Mapping[str, Any], request_id: str) -> None:
    if "max_new_tokens" in values and values["max_new_tokens"] <= 0:
        raise ProtocolError(BAD_REQUEST, f"max_new_tokens must be positive, got {values['max_new_tokens']}",
                            request_id)
    for name in ("cursor", "start", "end"):
        if name in values and values[name] < 0:
            raise ProtocolError(BAD_REQUEST, f"{name} must be a character offset >= 0, got {values[name]}", request_id)
    if "strength" in values:
        strength = values["strength"]
        if not math.isfinite(strength) or not 0.0 <= strength <= 1.0:
            raise ProtocolError(BAD_REQUEST, f"strength must be a number in [0, 1], got {strength}", request_id)


def parse_extra(chunks: list, request_id: str | None = None, *, field: str = "extra",
                other_keys: bool = False) -> tuple[str, ...]:
    """`[{"text": ..., "filename": ...}, ...]` (llama.cpp's `input_extra` shape) to the engine's chunk texts.

    `other_keys` lets objects carry keys besides text and filename (llama.vim adds `time`); the
    websocket protocol refuses them, as it refuses every unknown field.
    """
    texts = []
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str):
            raise ProtocolError(BAD_REQUEST, f"{field}[{i}] must be an object with a string \"text\" (and an "
                                             f"optional \"filename\"), got {_short(chunk)}", request_id)
        filename = chunk.get("filename")
        if filename is not None and not isinstance(filename, str):
            raise ProtocolError(BAD_REQUEST, f"{field}[{i}].filename must be a string, got {_short(filename)}",
                                request_id)
        unknown = sorted(set(chunk) - {"text", "filename"})
        if unknown and not other_keys:
            raise ProtocolError(BAD_REQUEST, f"unknown field(s) in {field}[{i}]: {', '.join(unknown)}; accepted: "
                                             "text, filename", request_id)
        texts.append(extra_chunk(chunk["text"], filename or None))
    return tuple(texts)


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    # JSON true/false are Python bools, which are ints: never accept them where a number is expected.
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- frames
def event_frame(event: Step | Done | Error, request_id: str | None) -> str:
    """A core event as a server frame: the event's own wire shape plus the request id."""
    body = event.to_json()
    return dump({"type": body.pop("type"), "id": request_id, **body})


def error_frame(code: str, message: str, request_id: str | None = None) -> str:
    return event_frame(Error(code, message), request_id)


def cancelled_frame(request_id: str) -> str:
    return dump({"type": "cancelled", "id": request_id})


def dump(frame: Mapping[str, Any]) -> str:
    """Compact JSON; ASCII-escaped so that any text the tokenizer produces survives as a valid frame."""
    return json.dumps(frame, separators=(",", ":"), allow_nan=False)
