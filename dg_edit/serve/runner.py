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
from ..events import Done, Step


@dataclass(frozen=True)
class Job:
    """One engine request, whichever API it came from."""

    kind: Literal["infill", "rewrite"]
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


def job_events(engine, job: Job) -> Callable[[], Iterator[Step | Done]]:
    """A callable that starts the job's engine stream (called in a model worker thread).

    A job with a session also tells the engine what the session's document reads, as the request
    shows it (prefix + selection + suffix, behind its chunks of other files): idle prefill encodes it
    while the service is quiet, so the next request anywhere in it starts warm.
    """
    if job.session is not None:
        engine.prefill(job.session, job.prefix + job.selection + job.suffix, extra=job.extra)
    if job.kind == "infill":
        return lambda: engine.stream(job.prefix, job.suffix, max_new_tokens=job.max_new_tokens, seed=job.seed,
                                     session=job.session, single_line=job.single_line, extra=job.extra,
                                     **job.sampling)
    return lambda: engine.stream_rewrite(job.prefix, job.selection, job.suffix, instruction=job.instruction,
                                         strength=job.strength, seed=job.seed, session=job.session, extra=job.extra,
                                         **job.sampling)


def run_job(engine, job: Job, *, cancel: threading.Event, executor: Executor) -> AsyncIterator[Step | Done]:
    """The job's `Step`s and final `Done` on the event loop; setting `cancel` (or leaving the
    iteration) stops the denoising loop before its next step."""
    return aiter_events(job_events(engine, job), cancel=cancel, executor=executor)
