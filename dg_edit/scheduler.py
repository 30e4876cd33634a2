"""One thread owns the model: every request's denoising steps share one decoder forward per step.

Why: a decoder forward over a few canvas rows costs about what one row costs (it is bound by reading
the weights), so N editors typing at once should not wait N forwards per step. Each request runs as a
coroutine (`Engine._request_steps`) that yields what it needs from the model instead of calling it:

    Forward(...)  its canvas for this step's decoder pass; it is sent back its logits [b, L, V]
    Sync(flags)   its step's flags [3]; it is sent them back as Python bools

and `Step`/`Done` events, which go to the consumer's queue. The scheduler loop, per step:

1. admit waiting requests at the step boundary, in arrival order, round-robin across clients, while
   the active requests' canvas rows fit `Settings.batch_rows` (a request's candidate rows are one unit);
2. drop cancelled requests (their consumer closed the stream); run newly admitted ones up to their
   first forward (their prefix is encoded there, one chunk per step: `Pause`);
3. one decoder forward over every active request's rows (`hf_adapter.batched_decoder_forward`), each
   with its own encoder cache, masks and positions; if it fails, each request's forward runs alone, so
   a failure costs only the request that causes it;
4. each request samples on its own generator (the same draws in the same order as alone), then one
   host sync for the whole batch (`Sync`).

`Settings.batching = false` admits one request at a time (each forward runs alone, as before).
Without a scheduler (`drive_alone`, used under --parallel where every rank must run the same calls in
the same order) a request's coroutine is driven in the consumer's thread.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import dataclasses
import logging
import queue
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Generator, Iterator

import torch

from . import hf_adapter as hf
from .events import Done, Step


class EngineClosed(RuntimeError):
    """The engine was closed (replaced, or its process is ending) before this request could run."""


@dataclass
class Forward:
    """A request's decoder pass for this step (what `hf.decoder_forward` takes when it runs alone)."""

    part: hf.BatchPart
    masks: Any  # its own decoder masks (`hf.decoder_masks`), used when it runs alone


@dataclass
class Sync:
    """A request's step flags, read on the host together with every other request's."""

    flags: torch.Tensor  # [3] bool


class Pause:
    """A request gives way until the next step (between encoder chunks of a long prefix)."""


PAUSE = Pause()
_LOG = logging.getLogger(__name__)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None
IDLE_EXIT_S = 60.0  # an idle scheduler's thread ends after this long; the next request starts another
GATHER_S = 0.01  # longest a step waits for a consumer that has not yet asked for its request's next step
RequestSteps = Generator[Any, Any, None]


def run_alone(engine, forward: Forward) -> torch.Tensor:  # [b, L, V]
    part = forward.part
    with engine.lock, engine.no_autograd():
        return hf.decoder_forward(engine.model, part.cache, part.canvas, part.position_ids, forward.masks,
                                  part.self_conditioning_logits)


def drive_alone(engine, steps: RequestSteps) -> Iterator[Step | Done]:
    """Run one request's coroutine in this thread, each forward alone (no scheduler)."""
    value: Any = None
    error: BaseException | None = None
    step_started, rows = None, 0  # this step's forward began then over `rows` canvas rows; its sync ends it
    try:
        while True:
            try:
                item = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration:
                return
            value, error = None, None
            if isinstance(item, Forward):
                step_started, rows = time.perf_counter(), item.part.canvas.shape[0]
                try:
                    value = run_alone(engine, item)
                except Exception as e:  # thrown into the request, which turns OOM into its own error
                    error = e
            elif isinstance(item, Sync):
                value = item.flags.tolist()
                observer = engine.observer  # metrics (under --parallel too, where no scheduler runs)
                if observer is not None and step_started is not None:
                    observer.on_step(rows, 1, time.perf_counter() - step_started, 0)
                step_started = None
            elif isinstance(item, Pause):
                pass
            else:
                yield item
    finally:
        steps.close()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class _Ticket:
    """One request inside the scheduler."""

    def __init__(self, steps: RequestSteps, rows: int, client: str):
        self.steps = steps
        self.rows = rows
        self.client = client
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.arrived = time.perf_counter()
        self.waited_s = 0.0
        self.cancelled = False
        # Pull, as a plain generator: a request's next forward runs only once its consumer has asked for
        # an event it has not been given yet, so stopping the stream stops its steps.
        self.asked = 0  # events the consumer has asked for, counting up
        self.given = 0  # events put on its queue, counting up
        self.pending: Any = None  # Forward | Sync | Pause | None (runs on at the next step)


_RUNNING: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()  # schedulers whose thread may be alive


@atexit.register
def _stop_all_at_exit() -> None:
    """Stop every scheduler thread before the interpreter finalizes: a daemon thread still inside a torch
    kernel then aborts the process (exit code 134), as dg_edit/prefill.py explains."""
    for scheduler in list(_RUNNING):
        scheduler.stop(timeout=10.0)


class Scheduler:
    """Owns the model for every request of one engine (see the module docstring)."""

    def __init__(self, engine, batch_rows: int, batching: bool):
        self.engine = engine
        self.batch_rows = max(1, batch_rows)
        self.batching = batching
        self._cond = threading.Condition()
        self._waiting: OrderedDict[str, deque[_Ticket]] = OrderedDict()  # client -> its requests, in order
        self._active: list[_Ticket] = []
        self._stacked: hf.StackedBatch | None = None
        self._stopped = False
        self._ran = False  # steps ran since the scheduler was last idle
        self._thread: threading.Thread | None = None
        self.steps_run = 0  # batched steps so far, counting up (tests, stats)
        self.max_batch = 0  # most requests one forward has carried (tests, stats)

    # ------------------------------------------------------------------ consumer side
    def events(self, steps: RequestSteps, rows: int, client: str) -> Iterator[Step | Done]:
        """Submit a request and yield its events; closing this generator cancels it at the next step."""
        ticket = _Ticket(steps, rows, client)
        with self._cond:
            if self._stopped:
                raise EngineClosed("the engine was closed")
            self._waiting.setdefault(client, deque()).append(ticket)
            self._start()
            self._cond.notify_all()
        try:
            while True:
                with self._cond:
                    ticket.asked += 1
                    self._cond.notify_all()
                item = ticket.events.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            with self._cond:
                ticket.cancelled = True
                self._cond.notify_all()

    def queue_depth(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._waiting.values())

    def stop(self, timeout: float | None = None) -> None:
        """Fail what is waiting or running ("the engine was closed") and end the thread (waiting up to
        `timeout` for the step in progress)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            thread = self._thread
        if timeout is not None and thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="dg-edit-scheduler", daemon=True)
            self._thread.start()
            _RUNNING.add(self)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    self._drop_cancelled_waiting()
                    self._admit()
                    if any(self._runnable(t) for t in self._active):
                        break
                    if not self._active and not self._waiting and self._ran:
                        self._idle()
                    if not self._cond.wait(IDLE_EXIT_S) and not self._active and not self._waiting:
                        self._thread = None  # idle: the thread ends (an engine replaced by another leaves none)
                        return
                if self._stopped:
                    leftover = self._active + [t for q in self._waiting.values() for t in q]
                    self._active, self._waiting = [], OrderedDict()
                    break
                active = list(self._active)
            self._step(active)
        for ticket in leftover:
            ticket.steps.close()
            ticket.events.put(_Failed(EngineClosed("the engine was closed")))

    def _idle(self) -> None:
        """Nothing to run: drop the last batch's stacked caches, and on a CPU give the heap that a burst of
        batched steps left free back to the system (glibc keeps freed mid-size blocks otherwise, and a
        server's resident memory would stay at its busiest)."""
        self._stacked = None
        self._ran = False
        if self.engine.model.device.type == "cpu" and _LIBC is not None:
            _LIBC.malloc_trim(0)

    def _runnable(self, ticket: _Ticket) -> bool:
        if ticket.cancelled or ticket.pending is None or isinstance(ticket.pending, Pause):
            return True
        return isinstance(ticket.pending, Forward) and self._wanted(ticket)

    @staticmethod
    def _wanted(ticket: _Ticket) -> bool:
        """Its consumer wants its next step: it is waiting for an event now (a stream not read runs no step,
        as a plain generator; `_gather` waits a moment for consumers that are about to ask)."""
        return ticket.asked > ticket.given

    def _gather(self) -> list[_Ticket]:
        """The requests whose forward runs this step: every one parked on a forward whose consumer has asked
        for its next event, waiting up to `GATHER_S` for consumers that are a moment late (a thread wake-up)."""
        deadline = time.perf_counter() + GATHER_S
        with self._cond:
            while True:
                parked = [t for t in self._active if isinstance(t.pending, Forward) and not t.cancelled]
                ready = [t for t in parked if self._wanted(t)]
                left = deadline - time.perf_counter()
                if len(ready) == len(parked) or left <= 0:
                    return ready
                self._cond.wait(left)

    def _drop_cancelled_waiting(self) -> None:
        for client in list(self._waiting):
            kept = deque(t for t in self._waiting[client] if not t.cancelled)
            for t in self._waiting[client]:
                if t.cancelled:
                    t.steps.close()
            if kept:
                self._waiting[client] = kept
            else:
                del self._waiting[client]

    def _admit(self) -> None:
        """1. Round-robin across clients, each client's requests in order, while the rows fit."""
        used = sum(t.rows for t in self._active)
        limit = self.batch_rows if self.batching else 1
        while self._waiting:
            client, waiting = next(iter(self._waiting.items()))
            ticket = waiting[0]
            if self._active and (used + ticket.rows > limit or not self.batching):
                return  # in order: the head waits for room (a request larger than the limit runs alone)
            waiting.popleft()
            del self._waiting[client]
            if waiting:
                self._waiting[client] = waiting  # this client goes to the back of the round
            ticket.waited_s = time.perf_counter() - ticket.arrived
            self._active.append(ticket)
            used += ticket.rows
            observer = self.engine.observer
            if observer is not None:
                observer.on_admit(ticket.waited_s)

    def _step(self, active: list[_Ticket]) -> None:
        t0 = time.perf_counter()
        for ticket in active:
            if ticket.cancelled:
                self._finish(ticket, close=True)
        # 2. Requests not waiting on the model run on: new ones encode (a chunk), finished blocks start the next.
        for ticket in self._active:
            if ticket.pending is None or isinstance(ticket.pending, Pause):
                self._advance(ticket, None)
        # 3. One decoder forward over every canvas whose consumer wants its next step.
        forwards = self._gather()
        ran = self._forward(forwards) if forwards else []
        # 4. One host sync for the whole batch.
        syncs = [t for t in self._active if isinstance(t.pending, Sync)]
        if syncs:
            flags = torch.stack([t.pending.flags for t in syncs]).tolist()
            for ticket, values in zip(syncs, flags):
                self._advance(ticket, values)
        if forwards:
            self._ran = True
            self.steps_run += 1
            self.max_batch = max(self.max_batch, len(forwards))
        if ran:  # a step is a decoder forward that gave logits: one that raised is its request's error
            observer = self.engine.observer
            if observer is not None:
                observer.on_step(sum(ran), len(ran), time.perf_counter() - t0, self.queue_depth())

    def _forward(self, tickets: list[_Ticket]) -> list[int]:
        """One decoder forward for `tickets` (each alone if the batched one fails); the canvas rows of each
        request whose forward gave logits."""
        engine = self.engine
        if len(tickets) > 1:
            parts = [t.pending.part for t in tickets]
            try:
                with engine.lock, engine.no_autograd():
                    if self._stacked is None or not self._stacked.fits(parts):
                        self._stacked = None  # its memory goes before the next stack is built
                        self._stacked = hf.stack_batch(engine.model, parts)
                    logits = hf.batched_decoder_forward(engine.model, self._stacked, parts)
            except Exception:  # noqa: BLE001 - rerun alone below: a failure costs only its own request
                self._stacked = None
                if engine.model.device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                # Each part's logits are a view of the batch's [B, L, V] buffer: handed over without keeping a
                # reference here, so the buffer goes as soon as the last request done with it lets go.
                rows = [t.rows for t in tickets]
                for ticket in tickets:
                    self._advance(ticket, logits.pop(0))
                return rows
        else:
            self._stacked = None
        rows = []
        for ticket in tickets:
            try:
                own = [run_alone(engine, ticket.pending)]
            except Exception as e:  # thrown into the request, which turns OOM into its own error
                self._advance(ticket, None, error=e)
            else:
                rows.append(ticket.rows)
                self._advance(ticket, own.pop())
        return rows

    def _advance(self, ticket: _Ticket, value: Any, error: BaseException | None = None) -> None:
        """Run a request's coroutine until it needs the model again, passing its events on."""
        while True:
            try:
                item = ticket.steps.throw(error) if error is not None else ticket.steps.send(value)
            except StopIteration:
                self._finish(ticket)
                return
            except BaseException as e:  # noqa: BLE001 - the request's own failure, re-raised to its consumer
                ticket.events.put(_Failed(e))
                self._finish(ticket)
                return
            value, error = None, None
            if isinstance(item, (Forward, Sync, Pause)):
                ticket.pending = item
                return
            ticket.pending = None
            if isinstance(item, Done):
                # The request is over: let its coroutine unwind (its tensors go) before its consumer hears.
                done = dataclasses.replace(item, waited_ms=ticket.waited_s * 1000.0)
                try:
                    ticket.steps.send(None)
                    ticket.steps.close()  # it went on after its answer: stopped here
                except StopIteration:
                    pass
                except Exception:  # noqa: BLE001 - the answer stands; the unwinding's failure is logged
                    _LOG.exception("a request failed while unwinding after its answer")
                self._finish(ticket, last=done)
                return
            ticket.given += 1
            ticket.events.put(item)

    def _finish(self, ticket: _Ticket, close: bool = False, last: Done | None = None) -> None:
        if close:
            ticket.steps.close()
        ticket.pending = None
        with self._cond:
            if ticket in self._active:
                self._active.remove(ticket)
            if not self._active and not self._waiting and self._ran:
                self._idle()  # before the last answer goes out: the service is at rest when its client hears
            self._cond.notify_all()
        if last is not None:
            ticket.given += 1
            ticket.events.put(last)
        ticket.events.put(_END)


def client_key(session: str | None) -> str:
    """Whose request this is, for fair admission: the service scopes sessions as "<client>:<document>"
    (an HTTP client address and user, a websocket connection), so everything before the last ':'."""
    if not session:
        return ""
    return session.rsplit(":", 1)[0] if ":" in session else session

