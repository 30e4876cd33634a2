"""Run an engine stream off the event loop and receive its events on it.

Used by every asyncio front end (the LSP server, the websocket service) so the model never blocks
the loop: the engine iterates in a worker thread, events cross over with `call_soon_threadsafe`,
and cancelling the consuming task (or leaving the `async for`) stops the denoising loop before its
next step.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor
from typing import AsyncIterator, Callable, Iterator

from .events import Done, Step

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


async def aiter_events(
    make_events: Callable[[], Iterator[Step | Done]],
    cancel: threading.Event | None = None,
    executor: Executor | None = None,
) -> AsyncIterator[Step | Done]:
    """Yield the events of `make_events()` (called in a worker thread) on the running loop.

    Exceptions raised by the engine (bad input, model failure) are re-raised here. Setting `cancel`
    or abandoning the iterator stops the worker within one denoising step.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = cancel if cancel is not None else threading.Event()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed under us (server shutting down)
            cancel.set()

    def worker() -> None:
        events = None
        try:
            events = make_events()
            for event in events:
                if cancel.is_set():
                    break
                put(event)
        except BaseException as exc:  # handed to the consumer, which reports it
            put(_Failure(exc))
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
            put(_END)

    loop.run_in_executor(executor, worker)
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        cancel.set()
