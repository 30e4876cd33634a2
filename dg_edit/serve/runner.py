"""The one place where the service calls its engine.

Every route of `dg-edit serve` (the websocket protocol, the OpenAI and llama.cpp HTTP APIs) turns its
request into a `Job` and reads the job's events through `run_job`. Keeping the engine call here means
a change to how the service drives its engine (another engine behind the same interface, idle work
between requests) is made once for every API.
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Mapping

from ..aio import aiter_events
from ..edits import TextEdit
from ..events import Done, Step


@dataclass(frozen=True)
class Job:
    """One engine request, whichever API it came from."""

    kind: Literal["infill", "rewrite", "next_edit"]
    prefix: str
    suffix: str = ""
    selection: str = ""  # rewrite: the text re-denoised in place
    instruction: str | None = None  # rewrite
    strength: float = 0.6  # rewrite
    max_new_tokens: int | None = None  # infill; None: Settings.max_new_tokens
    seed: int | None = None
    session: str | None = None  # prefix-cache key, already scoped by the caller
    single_line: bool | None = None  # infill; None: the engine decides from the cursor's line
    extra: tuple[str, ...] = ()  # chunks of other files (dg_edit.extra), ahead of the prefix
    sampling: Mapping[str, Any] = field(default_factory=dict)  # SamplingConfig overrides
    # next_edit: the whole document is `prefix`, the cursor a character offset into it; `edits`, when
    # given, are the recent edits to condition on instead of the session's history (stateless HTTP).
    cursor: int = 0
    edits: tuple[TextEdit, ...] | None = None


def job_events(engine, job: Job) -> Callable[[], Iterator[Step | Done]]:
    """A callable that starts the job's engine stream (called in a model worker thread).

    A job with a session also tells the engine what the session's document reads, as the request
    shows it (prefix + selection + suffix, behind its chunks of other files): idle prefill encodes it
    while the service is quiet, so the next request anywhere in it starts warm.
    """
    if job.session is not None:
        engine.prefill(job.session, job.prefix + job.selection + job.suffix, extra=job.extra)
    if job.kind == "next_edit":
        return lambda: engine.stream_next_edit(job.prefix, job.cursor, session=job.session, seed=job.seed,
                                               sampling=dict(job.sampling) or None, extra=job.extra, edits=job.edits)
    if job.kind == "infill":
        return lambda: engine.stream(job.prefix, job.suffix, max_new_tokens=job.max_new_tokens, seed=job.seed,
                                     session=job.session, single_line=job.single_line, extra=job.extra,
                                     **job.sampling)
    return lambda: engine.stream_rewrite(job.prefix, job.selection, job.suffix, instruction=job.instruction,
                                         strength=job.strength, seed=job.seed, session=job.session, extra=job.extra,
                                         **job.sampling)


def record_edit(engine, session: str, edit: TextEdit, document: str | None = None, cursor: int | None = None) -> None:
    """The user made `edit` to `session`'s document: into its edit history; with the whole `document`
    after the edit and the `cursor`, its caches are prefilled and the next edit there prepared while
    the service is quiet. Cheap (no model call): front ends call it on their event loop."""
    if document is not None:  # checked before the edit is recorded: a refused frame changes nothing
        try:
            document.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"document is not valid UTF-8 text ({e.reason} at position {e.start})") from None
        if cursor is None or not 0 <= cursor <= len(document):
            raise ValueError(f"cursor must be a character offset in [0, {len(document)}], got {cursor!r}")
    engine.record_edit(session, edit)
    if document is not None and cursor is not None:
        engine.prefill(session, document)
        engine.prepare_next_edit(session, document, cursor)


def run_job(engine, job: Job, *, cancel: threading.Event, executor: Executor) -> AsyncIterator[Step | Done]:
    """The job's `Step`s and final `Done` on the event loop; setting `cancel` (or leaving the
    iteration) stops the denoising loop before its next step."""
    return aiter_events(job_events(engine, job), cancel=cancel, executor=executor)
