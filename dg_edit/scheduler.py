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

A step is split in two: what only this process can decide (`StepPlan`: which waiting requests join,
which consumers have gone) and what follows from the requests' own state (everything else above). Under
--parallel (dg_edit/distributed.py) every rank holds a sharded model and must run the same forwards in
the same order, so the schedulers run in lockstep (`Scheduler.lockstep`): rank 0's scheduler plans each
step and hands the plan to every rank, its own included, which `apply` it to the same requests (opened on
every rank in the same order, so their ticket ids agree). There every parked forward runs, whether or not
its consumer has read its last event (only rank 0 has consumers), and any failure other than a request's
own bad input stops the launch instead of costing one request.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import dataclasses
import itertools
import logging
import queue
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator

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


@dataclass(frozen=True)
class StepPlan:
    """What the deciding scheduler chose for one step; the rest of the step follows from the requests' state."""

    admitted: tuple[int, ...] = ()  # ticket ids that join the active requests, in this order
    cancelled: tuple[int, ...] = ()  # ticket ids whose consumer has gone (waiting or active): dropped


@dataclass(frozen=True)
class StepOutcome:
    """What one applied step did, equal on every rank of a --parallel launch (token ids, not timings)."""

    forwards: int  # requests whose decoder forward ran (each one step of theirs, as if run alone)
    events: tuple  # (ticket id, event kind, token ids or error) of each event given, in order
_LOG = logging.getLogger(__name__)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None
IDLE_EXIT_S = 60.0  # an idle scheduler's thread ends after this long; the next request starts another
REST_AFTER_S = 1.0  # the heap goes back to the system after this long without a request (a pause, not a gap)
GATHER_S = 0.01  # longest a step waits for a consumer that has not yet asked for its request's next step
RequestSteps = Generator[Any, Any, None]


def forward_alone(engine, forward: Forward) -> torch.Tensor:  # [b, L, V]
    part = forward.part
    with engine.lock, engine.no_autograd():
        return hf.decoder_forward(engine.model, part.cache, part.canvas, part.position_ids, forward.masks,
                                  part.self_conditioning_logits)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class _Ticket:
    """One request inside the scheduler."""

    def __init__(self, ticket_id: int, steps: RequestSteps, rows: int, client: str):
        self.id = ticket_id  # counting up per scheduler; equal on every rank of a --parallel launch
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
        self._ids = itertools.count(1)
        self._tickets: dict[int, _Ticket] = {}  # every request submitted and not finished, by id
        self._waiting: OrderedDict[str, deque[_Ticket]] = OrderedDict()  # client -> its requests, in order
        self._active: list[_Ticket] = []
        self._stacked: hf.StackedBatch | None = None
        self._stopped = False
        self._ran = False  # steps ran since the scheduler was last idle
        self._thread: threading.Thread | None = None
        # --parallel (`lockstep`): rank 0 hands each plan to every rank through `_run_step`; the other ranks
        # have no thread and are given plans; `_fatal` says which failures stop the launch.
        self._lockstep = False
        self._run_step: Callable[[StepPlan], Any] | None = None
        self._fatal: Callable[[BaseException], bool] = lambda error: False
        self.steps_run = 0  # batched steps so far, counting up (tests, stats)
        self.max_batch = 0  # most requests one forward has carried (tests, stats)

    def lockstep(self, run_step: Callable[[StepPlan], Any] | None, fatal: Callable[[BaseException], bool]) -> None:
        """Run in step with the schedulers of the other ranks of a --parallel launch (before any request).

        `run_step(plan)`: rank 0's, which decides each step; it must get `apply(plan)` run on every rank,
        this one included, in the same order as the calls that open requests. None: a rank that follows,
        whose plans come from rank 0 (it starts no thread). `fatal(error)`: a failure inside a step that
        leaves the ranks out of step (anything but a request's own bad input); it is raised out of `apply`.
        """
        self._lockstep, self._run_step, self._fatal = True, run_step, fatal

    @property
    def busy(self) -> bool:
        """Requests are waiting or running."""
        with self._cond:
            return bool(self._tickets)

    # ------------------------------------------------------------------ consumer side
    def events(self, steps: RequestSteps, rows: int, client: str) -> Iterator[Step | Done]:
        """Submit a request and return its events; closing the iterator cancels it at the next step.

        In lockstep it joins the queue now (every rank opens requests in the same order, so each gets the
        same id everywhere); otherwise when its consumer first asks for an event, as a plain generator.
        """
        ticket = _Ticket(next(self._ids), steps, rows, client)
        if self._lockstep:
            self._submit(ticket)
        return self._events(ticket, submitted=self._lockstep)

    def _submit(self, ticket: _Ticket) -> None:
        with self._cond:
            if self._stopped:
                raise EngineClosed("the engine was closed")
            self._tickets[ticket.id] = ticket
            self._waiting.setdefault(ticket.client, deque()).append(ticket)
            if self._run_step is not None or not self._lockstep:
                self._start()
            self._cond.notify_all()

    def _events(self, ticket: _Ticket, submitted: bool) -> Iterator[Step | Done]:
        if not submitted:
            self._submit(ticket)
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
            threadless = self._lockstep and self._run_step is None
        if threadless:  # a following rank: nothing else will close its requests
            self._fail_all(EngineClosed("the engine was closed"))
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
                    plan = self._plan()
                    if plan.admitted or plan.cancelled or any(self._runnable(t) for t in self._active):
                        break
                    if not self._active and not self._waiting and self._ran:
                        if not self._cond.wait(REST_AFTER_S):
                            self._rest()
                        continue
                    if not self._cond.wait(IDLE_EXIT_S) and not self._active and not self._waiting:
                        self._thread = None  # idle: the thread ends (an engine replaced by another leaves none)
                        return
                if self._stopped:
                    break
            if self._run_step is None:
                self.apply(plan)
                continue
            try:
                self._run_step(plan)  # rank 0 under --parallel: every rank applies it, this one included
            except BaseException as e:  # noqa: BLE001 - the launch failed: every request here hears why
                with self._cond:
                    self._stopped = True
                self._fail_all(e)
                return
        self._fail_all(EngineClosed("the engine was closed"))

    def _fail_all(self, error: BaseException) -> None:
        """Close every request, waiting or running, and tell its consumer `error`."""
        with self._cond:
            tickets = list(self._tickets.values())
            self._tickets, self._active, self._waiting = {}, [], OrderedDict()
        for ticket in tickets:
            try:
                ticket.steps.close()
            except Exception:  # noqa: BLE001 - it is being failed anyway; its consumer hears `error`
                _LOG.exception("a request failed while closing")
            ticket.events.put(_Failed(error))
            ticket.events.put(_END)

    def _rest(self) -> None:
        """A pause: on a CPU give the heap that a burst of batched steps left free back to the system (glibc
        keeps freed mid-size blocks otherwise, and a server's resident memory would stay at its busiest).
        Not between two requests of one client: the next one would page-fault it all back in (6-7 ms of
        kernel time per single-line request after a burst, measured with bench/concurrency.py at 1 client)."""
        self._stacked = None
        self._ran = False
        if self.engine.model.device.type == "cpu" and _LIBC is not None:
            _LIBC.malloc_trim(0)

    def _runnable(self, ticket: _Ticket) -> bool:
        if ticket.pending is None or isinstance(ticket.pending, Pause):
            return True
        return isinstance(ticket.pending, Forward) and (self._lockstep or self._wanted(ticket))

    @staticmethod
    def _wanted(ticket: _Ticket) -> bool:
        """Its consumer wants its next step: it is waiting for an event now (a stream not read runs no step,
        as a plain generator; `_gather` waits a moment for consumers that are about to ask)."""
        return ticket.asked > ticket.given

    def _gather(self) -> list[_Ticket]:
        """The requests whose forward runs this step: every one parked on a forward whose consumer has asked
        for its next event, waiting up to `GATHER_S` for consumers that are a moment late (a thread wake-up).
        In lockstep every parked forward runs (only rank 0 has consumers; the plan is what they decide)."""
        if self._lockstep:
            return [t for t in self._active if isinstance(t.pending, Forward)]
        deadline = time.perf_counter() + GATHER_S
        with self._cond:
            while True:
                parked = [t for t in self._active if isinstance(t.pending, Forward) and not t.cancelled]
                ready = [t for t in parked if self._wanted(t)]
                left = deadline - time.perf_counter()
                if len(ready) == len(parked) or left <= 0:
                    return ready
                self._cond.wait(left)

    def _plan(self) -> StepPlan:
        """This step's decisions (under the lock): the requests whose consumer has gone, and which waiting
        ones join: round-robin across clients, each client's requests in order, while the rows fit."""
        cancelled = tuple(t.id for t in self._tickets.values() if t.cancelled)
        used = sum(t.rows for t in self._active if not t.cancelled)
        active = any(not t.cancelled for t in self._active)
        limit = self.batch_rows if self.batching else 1
        waiting = OrderedDict((client, deque(t for t in q if not t.cancelled)) for client, q in self._waiting.items())
        admitted = []
        while waiting:
            client, queued = next(iter(waiting.items()))
            if not queued:
                del waiting[client]
                continue
            ticket = queued[0]
            if active and (used + ticket.rows > limit or not self.batching):
                break  # in order: the head waits for room (a request larger than the limit runs alone)
            queued.popleft()
            waiting.move_to_end(client)  # this client goes to the back of the round
            admitted.append(ticket.id)
            used += ticket.rows
            active = True
        return StepPlan(tuple(admitted), cancelled)

    def _apply_plan(self, plan: StepPlan) -> None:
        """1. The gone requests leave (a waiting one never started); the admitted ones join, as planned."""
        for ticket_id in plan.cancelled:
            ticket = self._tickets.get(ticket_id)
            if ticket is None:
                continue
            if ticket in self._active:
                self._finish(ticket, close=True)
                continue
            with self._cond:
                queued = self._waiting[ticket.client]
                queued.remove(ticket)  # its client keeps its place in the round
                if not queued:
                    del self._waiting[ticket.client]
                del self._tickets[ticket_id]
            ticket.steps.close()
            ticket.events.put(_END)
        for ticket_id in plan.admitted:
            with self._cond:
                ticket = self._tickets[ticket_id]
                self._unqueue(ticket)
                self._active.append(ticket)
            ticket.waited_s = time.perf_counter() - ticket.arrived
            observer = self.engine.observer
            if observer is not None:
                observer.on_admit(ticket.waited_s)

    def _unqueue(self, ticket: _Ticket) -> None:
        queued = self._waiting.pop(ticket.client)
        queued.remove(ticket)
        if queued:
            self._waiting[ticket.client] = queued  # the client goes to the back of the round, as planned

    def apply(self, plan: StepPlan) -> StepOutcome:
        """Run one step as `plan` says (the scheduler's thread; under --parallel every rank, given rank 0's plan)."""
        t0 = time.perf_counter()
        given: list[tuple] = []  # the events this step gave, for the outcome
        self._apply_plan(plan)
        # 2. Requests not waiting on the model run on: new ones encode (a chunk), finished blocks start the next.
        for ticket in list(self._active):
            if ticket.pending is None or isinstance(ticket.pending, Pause):
                self._advance(ticket, None, given)
        # 3. One decoder forward over every canvas whose consumer wants its next step.
        forwards = self._gather()
        ran = self._forward(forwards, given) if forwards else []
        # 4. One host sync for the whole batch.
        syncs = [t for t in self._active if isinstance(t.pending, Sync)]
        if syncs:
            flags = torch.stack([t.pending.flags for t in syncs]).tolist()
            for ticket, values in zip(syncs, flags):
                self._advance(ticket, values, given)
        if forwards:
            self._ran = True
            self.steps_run += 1
            self.max_batch = max(self.max_batch, len(forwards))
        if ran:  # a step is a decoder forward that gave logits: one that raised is its request's error
            observer = self.engine.observer
            if observer is not None:
                observer.on_step(sum(ran), len(ran), time.perf_counter() - t0, self.queue_depth())
        return StepOutcome(len(ran), tuple(given))

    def _forward(self, tickets: list[_Ticket], given: list[tuple]) -> list[int]:
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
            except Exception as e:  # noqa: BLE001 - rerun alone below: a failure costs only its own request
                self._stacked = None
                if self._lockstep and not isinstance(e, hf.CannotBatch):
                    raise  # the ranks' collectives may no longer meet: the launch stops
                if engine.model.device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                # Each part's logits are a view of the batch's [B, L, V] buffer: handed over without keeping a
                # reference here, so the buffer goes as soon as the last request done with it lets go.
                rows = [t.rows for t in tickets]
                for ticket in tickets:
                    self._advance(ticket, logits.pop(0), given)
                return rows
        else:
            self._stacked = None
        rows = []
        for ticket in tickets:
            try:
                own = [forward_alone(engine, ticket.pending)]
            except Exception as e:  # thrown into the request, which turns OOM into its own error
                self._advance(ticket, None, given, error=e)
            else:
                rows.append(ticket.rows)
                self._advance(ticket, own.pop(), given)
        return rows

    def _advance(self, ticket: _Ticket, value: Any, given: list[tuple], error: BaseException | None = None) -> None:
        """Run a request's coroutine until it needs the model again, passing its events on."""
        while True:
            try:
                item = ticket.steps.throw(error) if error is not None else ticket.steps.send(value)
            except StopIteration:
                self._finish(ticket)
                return
            except BaseException as e:  # noqa: BLE001 - the request's own failure, re-raised to its consumer
                if self._fatal(e):
                    raise
                given.append((ticket.id, "raise", type(e).__name__, str(e)))
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
                given.append((ticket.id, "done", done.ids, done.steps))
                self._finish(ticket, last=done)
                return
            given.append((ticket.id, "step", getattr(item, "index", None), getattr(item, "ids", None)))
            ticket.given += 1
            ticket.events.put(item)

    def _finish(self, ticket: _Ticket, close: bool = False, last: Done | None = None) -> None:
        if close:
            ticket.steps.close()
        ticket.pending = None
        with self._cond:
            if ticket in self._active:
                self._active.remove(ticket)
            self._tickets.pop(ticket.id, None)
            if not self._active and not self._waiting:
                # Before the last answer goes out: the batch's stacked caches are not held while idle. A
                # following rank has no loop to wait for a pause in: it rests now.
                self._stacked = None
                if self._ran and self._lockstep and self._run_step is None:
                    self._rest()
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

