"""Next-edit prediction: the edit the user will make next, near the cursor, by re-denoising a window.

After a rename at one use or a parameter added to a definition, the next edits are predictable (the
other uses, the call sites). A diffusion model rewrites a whole window in parallel, so this is the
rewrite path (`Engine.stream_rewrite`: start the canvas from the window's own tokens and renoise what
the model is least sure of), aimed by the recent edits:

1. Choose the window (`choose_window`): whole lines around the cursor within
   `Settings.next_edit_window_tokens`, more below the cursor than above (the next use, the next call
   site, usually follows the edit).
2. Condition on the text before the window (the document's warm prefix caches, through the session),
   the text after it (the clamped suffix head), and the recent edits as a context chunk ahead of the
   prefix (`history_chunk`, like chunks of other files).
3. Rewrite the window with `Settings.next_edit_strength`.
4. Read the rewrite back as edits (`edits_from_rewrite`): the minimal edits between the window and its
   rewrite, each scored by the model's confidence in the tokens it wrote, keeping those at or above
   `Settings.next_edit_min_score`. None left: the model keeps the window, no suggestion.

`NextEditPreparer` runs the same request in the background when the editor goes quiet after an edit
(`Engine.prepare_next_edit`), so that asking for it answers at once.

`repeat_last_edit` is the evaluation's baseline: repeat the last edit's change at its next occurrence.
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from .edits import EditHistory, TextEdit, diff_edits
from .events import Done, Step
from .scheduler import EngineClosed

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("dg_edit.next_edit")
HISTORY_HEADER = "# recent edits, oldest first (- before, + after):\n"
_MAX_PREPARED = 16  # prepared suggestions kept, one per session at most
_RUNNING: "weakref.WeakSet[NextEditPreparer]" = weakref.WeakSet()  # preparers whose thread may be alive


@atexit.register
def _stop_all_at_exit() -> None:
    """Stop every preparation thread before the interpreter finalizes: a daemon thread still inside a
    torch kernel at shutdown aborts the process (as for idle prefill, `dg_edit.prefill`)."""
    for preparer in list(_RUNNING):
        preparer.shutdown(timeout=10.0)


# ---------------------------------------------------------------------- 1. the window
@dataclass(frozen=True)
class EditWindow:
    """The characters `text[start:end]` a next-edit request rewrites (whole lines)."""

    start: int
    end: int


def choose_window(text: str, cursor: int, count_tokens: Callable[[str], int], budget: int) -> EditWindow:
    """Whole lines around `cursor`'s line, within `budget` tokens: the cursor's line, then three lines
    below for each line above while they fit. The cursor's line is always in, even over budget."""
    if not 0 <= cursor <= len(text):
        raise ValueError(f"cursor {cursor} is outside the text (0..{len(text)})")
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    if starts[-1] == len(text) and len(starts) > 1 and text:
        starts.pop()  # the empty "line" after a final newline is no line to rewrite
    line = max(i for i, s in enumerate(starts) if s <= cursor)

    def span(i: int) -> str:
        return text[starts[i]: starts[i + 1] if i + 1 < len(starts) else len(text)]

    first, last = line, line  # inclusive line numbers
    used = count_tokens(span(line))
    below_turns = 0
    can_up, can_down = first > 0, last + 1 < len(starts)
    while can_up or can_down:
        go_down = can_down and (below_turns < 3 or not can_up)
        i = last + 1 if go_down else first - 1
        n = count_tokens(span(i))
        if used + n > budget:
            if go_down:
                can_down = False
            else:
                can_up = False
            continue
        used += n
        if go_down:
            last, below_turns = i, below_turns + 1
        else:
            first, below_turns = i, 0
        can_up, can_down = can_up and first > 0, can_down and last + 1 < len(starts)
    end = starts[last + 1] if last + 1 < len(starts) else len(text)
    return EditWindow(starts[first], end)


# ---------------------------------------------------------------------- 2. the edits as context
def history_chunk(text: str, edits: Sequence[TextEdit]) -> str:
    """The recent edits as the model reads them: for each, oldest first, the lines it changed, before
    (`-`) and after (`+`), as a diff would show them.

    An edit's offsets index the document as it was before that edit; later edits before it move it.
    Where the edit's text is found at its moved place in `text`, its whole lines are shown; otherwise
    (the text was edited again since) the changed text alone.
    """
    if not edits:
        return ""
    out = [HISTORY_HEADER]
    for i, edit in enumerate(edits):
        at = edit.start
        for later in edits[i + 1:]:
            if later.end <= at:
                at += len(later.text) - (later.end - later.start)
        if 0 <= at and text[at: at + len(edit.text)] == edit.text:
            line_start = text.rfind("\n", 0, at) + 1
            line_end = text.find("\n", at + len(edit.text))
            line_end = len(text) if line_end < 0 else line_end
            after = text[line_start:line_end]
            before = text[line_start:at] + edit.old_text + text[at + len(edit.text): line_end]
        else:
            before, after = edit.old_text, edit.text
        out += [f"-{s}\n" for s in before.split("\n")] if before else []
        out += [f"+{s}\n" for s in after.split("\n")] if after else []
    return "".join(out)


# ---------------------------------------------------------------------- 4. the rewrite as edits
def edits_from_rewrite(window_text: str, rewrite: str, window_start: int, last_step: Step | None,
                       min_score: float) -> tuple[TextEdit, ...]:
    """The edits between the window and its rewrite (offsets into the request's text), scored.

    A rewrite that stops early (EOS before the window's last lines) would read as deleting them: a
    deletion reaching the end of the window is the canvas running out, not a suggestion, and is dropped.
    """
    confidence = _char_confidence(rewrite, last_step)
    out = []
    shift = 0  # rewrite offset minus window offset, before the current edit
    for edit in diff_edits(window_text, rewrite):
        new_start = edit.start + shift
        shift += len(edit.text) - (edit.end - edit.start)
        if not edit.text and edit.end == len(window_text):
            continue
        lo, hi = new_start, new_start + len(edit.text)
        if hi == lo:  # a deletion: the model's confidence in what now meets there
            lo, hi = max(lo - 1, 0), min(hi + 1, len(rewrite))
        scores = confidence[lo:hi]
        score = sum(scores) / len(scores) if scores else 0.0
        if score < min_score:
            continue
        out.append(TextEdit(edit.start + window_start, edit.end + window_start, edit.text, edit.old_text,
                            score=score))
    return tuple(out)


def _char_confidence(rewrite: str, last_step: Step | None) -> list[float]:
    """Per character of `rewrite`: the confidence of the token that wrote it (the last step's tokens).

    Token texts decoded one by one may not add up to the text (a character split across byte tokens);
    then every character gets the mean confidence.
    """
    tokens = last_step.tokens if last_step is not None else ()
    if not tokens:
        return [0.0] * len(rewrite)
    if "".join(t.text for t in tokens)[: len(rewrite)] == rewrite:
        per_char: list[float] = []
        for t in tokens:
            per_char += [t.confidence] * len(t.text)
        return per_char[: len(rewrite)]
    mean = sum(t.confidence for t in tokens) / len(tokens)
    return [mean] * len(rewrite)


def read_edits(events: Iterator[Step | Done], window: EditWindow, window_text: str,
               min_score: float) -> Iterator[Step | Done]:
    """The rewrite's events, its `Done` turned into a next-edit answer: the edits, and the window they
    were chosen in. Closing this stream closes the rewrite's (cancellation reaches the engine)."""
    last_step = None
    try:
        for event in events:
            if isinstance(event, Done):
                edits = edits_from_rewrite(window_text, event.text, window.start, last_step, min_score)
                yield replace(event, edits=edits, window=(window.start, window.end))
                return
            last_step = event
            yield event
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


# ---------------------------------------------------------------------- steps 1-4
def run(engine: "Engine", text: str, cursor: int, session: str | None, seed: int, sampling: dict,
        extra: Sequence[str], history: Sequence[TextEdit]) -> Iterator[Step | Done]:
    """Steps 1–4 for one request (its input already checked by the engine): window, context, rewrite,
    edits. An empty window, or one with no context at all to aim it, is answered with no suggestion."""
    tok = engine.tokenizer
    settings = engine.settings
    window = choose_window(text, cursor, lambda s: len(tok.encode(s, add_special_tokens=False)),
                           settings.next_edit_window_tokens)
    prefix, window_text, suffix = text[: window.start], text[window.start: window.end], text[window.end:]
    chunk = history_chunk(text, history)
    extra = [*extra, chunk] if chunk else list(extra)
    if not prefix and not suffix and not any(extra) or not window_text.strip():
        return iter([Done(text=window_text, ids=(), steps=0, tokens_per_forward=0.0,
                          window=(window.start, window.end))])
    events = engine.stream_rewrite(prefix, window_text, suffix, strength=settings.next_edit_strength, seed=seed,
                                   session=session, extra=extra, **sampling)
    return read_edits(events, window, window_text, settings.next_edit_min_score)


# ---------------------------------------------------------------------- the baseline
def repeat_last_edit(text: str, cursor: int, edits: Sequence[TextEdit]) -> tuple[TextEdit, ...]:
    """Baseline: repeat the last edit's change (its old text → its new text) at the old text's next
    occurrence as a whole word after the cursor, else before it; nothing when there is none."""
    if not edits:
        return ()
    last = edits[-1]
    old, new = last.old_text, last.text
    if not old.strip():
        return ()
    pattern = re.compile((r"\b" if old[:1].isalnum() or old[:1] == "_" else "") + re.escape(old)
                         + (r"\b" if old[-1:].isalnum() or old[-1:] == "_" else ""))
    found = [m.start() for m in pattern.finditer(text)]
    after = [s for s in found if s >= cursor]
    at = after[0] if after else (found[-1] if found else None)
    if at is None:
        return ()
    return (TextEdit(at, at + len(old), new, old, score=1.0),)


# ---------------------------------------------------------------------- histories, per session
class Histories:
    """The engine's edit histories: one `EditHistory` per session, the least recently used dropped
    beyond `max_sessions`. Thread-safe (front ends record from their own threads)."""

    def __init__(self, max_sessions: int, max_edits: int, max_chars: int):
        self.max_sessions, self.max_edits, self.max_chars = max_sessions, max_edits, max_chars
        self._by_session: OrderedDict[str, EditHistory] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, session: str, edit: TextEdit) -> None:
        with self._lock:
            history = self._by_session.get(session)
            if history is None:
                history = self._by_session[session] = EditHistory(self.max_edits, self.max_chars)
            self._by_session.move_to_end(session)
            history.record(edit)
            while len(self._by_session) > self.max_sessions:
                self._by_session.popitem(last=False)

    def recent(self, session: str | None) -> tuple[tuple[TextEdit, ...], int]:
        """(edits, version) of `session`'s history; nothing for no session."""
        with self._lock:
            history = self._by_session.get(session) if session is not None else None
            return (history.recent(), history.version) if history is not None else ((), 0)

    def forget(self, session: str) -> None:
        with self._lock:
            self._by_session.pop(session, None)


# ---------------------------------------------------------------------- background preparation
class NextEditPreparer:
    """Prepares a session's next-edit answer while the editor is quiet; one background thread.

    `schedule` replaces the session's pending preparation and drops its prepared answer. The thread
    waits until the editor has been quiet for `Settings.idle_prefill_ms` and no request runs, then runs
    the request step by step, giving up as soon as another request starts (the user comes first). The
    answer is kept under everything that shaped it (text, cursor, history version, options), and
    `take` hands it out only for exactly that.
    """

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self._cond = threading.Condition()
        self._pending: OrderedDict[str, tuple] = OrderedDict()  # session -> key
        self._ready: OrderedDict[str, tuple[tuple, Done]] = OrderedDict()  # session -> (key, answer)
        self._quiet_until = 0.0
        self._thread: threading.Thread | None = None
        self._running: str | None = None
        self._stopping = False
        self.prepared = 0  # answers prepared since the engine started
        self.abandoned = 0  # preparations given up for a request
        self.last_error: str | None = None

    def schedule(self, key: tuple) -> None:
        session = key[0]
        with self._cond:
            self._ready.pop(session, None)
            self._pending[session] = key
            self._pending.move_to_end(session)
            self._quiet_until = time.monotonic() + self.engine.settings.idle_prefill_ms / 1000.0
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="dg-edit-next-edit", daemon=True)
                self._thread.start()
                _RUNNING.add(self)
            self._cond.notify_all()

    def take(self, key: tuple) -> Done | None:
        """The answer prepared for exactly `key`, else None (and a stale one is dropped)."""
        with self._cond:
            entry = self._ready.get(key[0])
            if entry is None:
                return None
            if entry[0] != key:
                del self._ready[key[0]]
                return None
            return entry[1]

    def forget(self, session: str) -> None:
        with self._cond:
            self._pending.pop(session, None)
            self._ready.pop(session, None)

    def shutdown(self, timeout: float | None = None) -> None:
        """Drop pending work and wait (up to `timeout`) for a running preparation to stop at its next step."""
        with self._cond:
            self._pending.clear()
            self._ready.clear()
            self._stopping = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._cond:
            self._stopping = False

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending or running (tests, benchmarks); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and self._running is None, timeout)

    def info(self) -> dict[str, Any]:
        with self._cond:
            return {"pending": len(self._pending), "running": self._running, "ready": len(self._ready),
                    "prepared": self.prepared, "abandoned": self.abandoned, "error": self.last_error}

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._pending:
                        self._thread = None
                        self._cond.notify_all()
                        return
                    wait = self._quiet_until - time.monotonic()
                    if wait <= 0 and self.engine.active_requests() == 0:
                        break
                    self._cond.wait(max(wait, 0.02))
                session, key = self._pending.popitem(last=False)
                self._running = session
            try:
                done = self._run(key)
                if done is not None:
                    with self._cond:
                        if session not in self._pending:  # nothing newer was asked for meanwhile
                            self._ready[session] = (key, done)
                            self._ready.move_to_end(session)
                            while len(self._ready) > _MAX_PREPARED:
                                self._ready.popitem(last=False)
                        self.prepared += 1
            except EngineClosed:  # closed meanwhile (replaced, or the program is ending): nobody will ask
                self.abandoned += 1
            except Exception as e:  # reported in info() and the log; the thread serves other sessions
                log.exception("preparing a next edit for %s failed", session)
                self.last_error = f"{type(e).__name__}: {e}"
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def _run(self, key: tuple) -> Done | None:
        session, text, cursor, _version, seed, sampling, extra = key
        events = self.engine._next_edit_events(text, cursor, session, seed, dict(sampling), extra)
        try:
            for event in events:
                if isinstance(event, Done):
                    return event
                with self._cond:
                    newer = session in self._pending or self._stopping
                if newer or self.engine.active_requests() > 1:  # ours counts as one
                    self.abandoned += 1
                    return None
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
        return None
