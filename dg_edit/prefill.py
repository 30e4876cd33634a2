"""Idle prefill: encode what a document's cache is missing while the editor is quiet.

After a front end tells the engine a document's text (`Engine.prefill(session, text)`: the language
server on open and change, the websocket service from each request's prefix and suffix, the TUI
on load and edit), one low-priority background thread per engine waits until the editor has been
quiet for `Settings.idle_prefill_ms` (no change, no request), then encodes every window of the
document (`Engine.document_windows`) one chunk at a time, nearest the last cursor first.

Never delaying a request: a request holds prefill off from its first step to its `Done`
(`Prefiller.request`), so prefill runs only between requests, and a request that arrives while a
chunk is being encoded waits for that one chunk at most. New text for the document being prefilled
stops the pass; the new text is prefilled after the next quiet moment.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("dg_edit.prefill")
NICENESS = 10  # the prefill thread's nice increment: other processes (and our requests) come first
_RUNNING: "weakref.WeakSet[Prefiller]" = weakref.WeakSet()  # prefillers whose thread may be alive


@atexit.register
def _stop_all_at_exit() -> None:
    """Stop every prefill thread before the interpreter finalizes.

    The thread is a daemon (an editor quitting must not wait for prefill), but a daemon thread still
    inside a torch kernel while the interpreter shuts down aborts the process ("terminate called
    without an active exception", exit code 134). So at exit each one finishes its chunk and ends.
    """
    for prefiller in list(_RUNNING):
        prefiller.shutdown(timeout=10.0)


class Prefiller:
    """The engine's idle-prefill scheduler; all its state is guarded by one condition variable."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self._cond = threading.Condition()
        # session -> (latest text, chunks of other files ahead of it); last = most recent
        self._pending: OrderedDict[str, tuple[str, tuple[str, ...]]] = OrderedDict()
        self._cursor: dict[str, int] = {}  # session -> character offset of the last request's cursor
        self._quiet_until = 0.0  # monotonic time before which the editor is not quiet
        self._active = 0  # requests running now
        self._thread: threading.Thread | None = None
        self._current: str | None = None  # the session being prefilled
        self._stop_current = False
        self.encoded = 0  # tokens encoded by prefill since the engine started
        self.passes = 0  # documents prefilled to the end
        self.budget_full = False  # the last pass stopped at Settings.cache_budget_mb
        self.last_error: str | None = None
        self.niceness: int | None = None  # the prefill thread's nice value, once it has run

    @property
    def idle_s(self) -> float:
        return self.engine.settings.idle_prefill_ms / 1000.0

    # ------------------------------------------------------------------ front ends and requests
    def schedule(self, session: str, text: str, extra: tuple[str, ...] = ()) -> None:
        """Prefill `text` (behind `extra`, as requests send it) for `session` after the next quiet moment
        (replaces any older text)."""
        with self._cond:
            self._pending[session] = (text, tuple(extra))
            self._pending.move_to_end(session)
            if self._current == session:
                self._stop_current = True
            self._quiet_until = time.monotonic() + self.idle_s
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="dg-edit-prefill", daemon=True)
                self._thread.start()
                _RUNNING.add(self)
            self._cond.notify_all()

    def cancel(self, session: str) -> None:
        with self._cond:
            self._pending.pop(session, None)
            self._cursor.pop(session, None)
            if self._current == session:
                self._stop_current = True
            self._cond.notify_all()

    def cancel_all(self) -> None:
        with self._cond:
            for session in list(self._pending):
                self._pending.pop(session)
            self._cursor.clear()
            self._stop_current = self._current is not None
            self._cond.notify_all()

    def shutdown(self, timeout: float | None = None) -> None:
        """Drop all pending work and wait (up to `timeout`) for the thread to finish its chunk and end."""
        self.cancel_all()
        with self._cond:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @contextlib.contextmanager
    def request(self, session: str | None, cursor: int | None) -> Iterator[None]:
        """Around a request: prefill waits until it is over, and for a quiet moment after it."""
        with self._cond:
            self._active += 1
            if session is not None and cursor is not None:
                self._cursor[session] = cursor
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._quiet_until = time.monotonic() + self.idle_s
                self._cond.notify_all()

    @property
    def active(self) -> int:
        """Requests running now (next-edit preparation gives way to them)."""
        with self._cond:
            return self._active

    def touch(self) -> None:
        """The user did something (a typed-ahead answer): not quiet yet."""
        with self._cond:
            self._quiet_until = time.monotonic() + self.idle_s

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending or being prefilled (tests, benchmarks); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and self._current is None, timeout)

    def info(self) -> dict:
        with self._cond:
            return {"pending": len(self._pending) + (self._current is not None), "running": self._current,
                    "encoded": self.encoded, "passes": self.passes, "budget_full": self.budget_full,
                    "error": self.last_error}

    # ------------------------------------------------------------------ the work
    def run_now(self, session: str, text: str, extra: tuple[str, ...] = ()) -> int:
        """Prefill `text` for `session` in the calling thread, without waiting for quiet; returns the
        tokens encoded. (Requests in other threads still hold it off between chunks.)"""
        before = self.encoded
        self._prefill_document(session, text, tuple(extra), wait_for_quiet=False)
        return self.encoded - before

    def _loop(self) -> None:
        self.niceness = _lower_priority()
        while True:
            with self._cond:
                while True:
                    if not self._pending:
                        self._thread = None
                        self._cond.notify_all()
                        return
                    if self._active == 0:
                        wait = self._quiet_until - time.monotonic()
                        if wait <= 0:
                            break
                    else:
                        wait = None
                    self._cond.wait(wait)
                session, (text, extra) = self._pending.popitem(last=True)
                self._current, self._stop_current = session, False
            try:
                self._prefill_document(session, text, extra, wait_for_quiet=True)
            except Exception as e:  # reported in info() and the log; the thread serves other documents
                log.exception("idle prefill of %s failed", session)
                self.last_error = f"{type(e).__name__}: {e}"
            finally:
                with self._cond:
                    self._current = None
                    self._cond.notify_all()

    def _stopped(self, session: str) -> bool:
        with self._cond:
            return self._stop_current and self._current == session

    def _may_continue(self, session: str, wait_for_quiet: bool) -> bool:
        """Wait until no request runs (and the editor is quiet); False when this pass should stop."""
        with self._cond:
            while True:
                if self._stop_current and self._current == session:
                    return False
                if self._active == 0:
                    wait = self._quiet_until - time.monotonic() if wait_for_quiet else 0.0
                    if wait <= 0:
                        return True
                else:
                    wait = None
                self._cond.wait(wait)

    def _prefill_document(self, session: str, text: str, extra: tuple[str, ...], wait_for_quiet: bool) -> None:
        engine = self.engine
        caches, model = engine.caches, engine.model
        with engine.lock:
            since = caches.tick()
            caches.touch(session)  # the document the editor just showed us: the last one to evict
        keys = set()
        for window in engine.document_windows(text, near=self._cursor.get(session, 0), extra=extra):
            keys.add(window.key)
            while True:
                if not self._may_continue(session, wait_for_quiet):
                    return
                with engine.lock, engine.no_autograd():
                    if self._stopped(session):  # forgotten while we waited for the lock
                        return
                    n = caches.prefill_step(model, session, window.key, window.ids, window.tail)
                if n == 0:
                    break
                if n < 0:
                    self.budget_full = True
                    return
                self.encoded += n
        with engine.lock:  # the whole document is done: strips of windows it no longer has can go
            caches.keep_only(session, keys, since)
        self.budget_full = False
        self.passes += 1


def _lower_priority() -> int | None:
    """Best effort: nice this thread by NICENESS (Linux gives each thread its own nice value) and return
    its nice value. A system that forbids it leaves prefill at normal priority."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + NICENESS, 19))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except (AttributeError, OSError) as e:
        log.debug("prefill thread keeps normal priority: %s", e)
        return None
