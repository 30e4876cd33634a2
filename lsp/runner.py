"""Running the engine for a request: off the event loop, cancellable per step, errors mapped to JSON-RPC.

Every model-backed feature (inline completion, completion, the rewrite/infill commands) goes
through `run_events`, so they share one boundary: the engine iterates in a worker thread
(`dg_edit.aio.aiter_events`), cancelling the handler's task stops the denoising loop before its next
step, a `ValueError` from the engine (bad input) becomes InvalidParams, and anything else is a
model failure: logged with `window/logMessage` and answered with an error, never a crash. A request
running longer than `settings.request_timeout_s` is stopped and answered with RequestFailed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable, Iterator

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInternalError, JsonRpcInvalidParams

from dg_edit.aio import aiter_events
from dg_edit.events import Done, Step

from .context import other_documents
from .engine_host import RequestFailed
from .progress import StepReporter
from .state import DgEditServer

if TYPE_CHECKING:  # documents -> next_edit -> runner: a run-time import would be circular
    from .documents import Cursor

logger = logging.getLogger(__name__)


async def run_events(ls: DgEditServer, make_events: Callable[[], Iterator[Step | Done]],
                     reporter: StepReporter | None = None) -> Done:
    """Consume one engine stream on the loop; returns its `Done`."""
    done: Done | None = None
    timeout = ls.settings.request_timeout_s
    try:
        async with asyncio.timeout(timeout):
            async for event in aiter_events(make_events):
                if isinstance(event, Step):
                    if reporter is not None:
                        reporter.step(event)
                elif isinstance(event, Done):
                    done = event
    except (asyncio.CancelledError, JsonRpcException):
        raise
    except TimeoutError:
        raise RequestFailed(f"dg-edit: the model took longer than request_timeout_s={timeout:g} s; "
                            "request stopped") from None
    except ValueError as e:
        raise JsonRpcInvalidParams(f"dg-edit: {e}") from None
    except Exception as e:
        logger.exception("model failure")
        ls.log(f"dg-edit: model failure: {type(e).__name__}: {e}", types.MessageType.Error)
        raise JsonRpcInternalError(f"dg-edit: model failure: {type(e).__name__}: {e}") from None
    if done is None:
        raise JsonRpcInternalError("dg-edit: the engine stopped without a result")
    return done


def trim_suffix_overlap(text: str, suffix: str) -> str:
    """Drop the end of `text` that repeats the start of `suffix` up to a line boundary.

    The engine conditions on the suffix, but a model can still write out the rest of the line (the
    closing bracket) or the next lines; inserted as they are, they would appear twice. Only overlaps
    that end where a suffix line ends and contain something besides whitespace are dropped, so a
    completion that merely ends in the same character as the suffix starts with is kept.
    """
    best = 0
    limit = min(len(text), len(suffix))
    for k in range(1, limit + 1):
        at_line_end = k == len(suffix) or suffix[k] in "\r\n"
        if at_line_end and text.endswith(suffix[:k]) and suffix[:k].strip():
            best = k
    return text[: len(text) - best] if best else text


async def infill_texts(ls: DgEditServer, cursor: Cursor, count: int, reporter: StepReporter | None = None,
                       record: dict | None = None) -> list[str]:
    """Up to `count` distinct, non-empty infills at `cursor` (seeds 0, 1, ...; at most 2*count tries).

    All runs use `session=uri`, so every run after the first reuses the document's prefix cache; the
    other open documents go ahead of the prefix (`context.other_documents`).
    Results are remembered per (uri, version, cursor, context) until the document or the settings change, so
    asking again at the same place (cursor moved back, Invoked after Automatic) only runs the
    seeds not tried yet. The reporter sees the steps of the first run only.
    """
    extra = other_documents(ls, cursor.uri)
    key = (cursor.uri, cursor.version, len(cursor.prefix), hash(cursor.prefix), hash(cursor.suffix), hash(extra))
    texts, tried = ls.recall(key)
    t0 = time.perf_counter()
    if record is not None:
        record.update(cached=tried > 0, encoded=0, prefix_tokens=None, steps=0, typed_ahead=False)
    if len(texts) < count and tried < 2 * count:
        engine = await ls.host.get()
        settings = ls.settings
        start = tried
        for seed in range(start, 2 * count):
            if len(texts) >= count:
                break
            first = seed == start
            done = await run_events(
                ls,
                lambda seed=seed: engine.stream(cursor.prefix, cursor.suffix, max_new_tokens=settings.max_new_tokens,
                                                seed=seed, session=cursor.uri, extra=extra,
                                                **dict(settings.sampling)),
                reporter if first else None)
            tried = seed + 1
            if first and record is not None:
                record.update(encoded=done.encoded, prefix_tokens=done.prefix_tokens, steps=done.steps,
                              typed_ahead=done.typed_ahead)
            text = trim_suffix_overlap(done.text, cursor.suffix)
            if text.strip() and text not in texts:
                texts.append(text)
            ls.remember(key, texts, tried)
    if record is not None:
        record["ms"] = round((time.perf_counter() - t0) * 1000.0, 1)
    if reporter is not None:
        reporter.done(texts[0] if texts else "")
    return texts[:count]
