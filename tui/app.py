"""`dg-edit tui FILE`: a terminal editor where a person infills and rewrites code and watches the
diffusion model work.

ctrl+space / f2 infill at the cursor, ctrl+r rewrite the selection; the draft refines in place as
ghost text, tab accepts, escape rejects (the buffer comes back byte for byte), ctrl+z undoes an
accepted proposal, f3 shows the canvas, ctrl+s saves atomically, ctrl+q quits.

Next edit: every change goes to the engine's edit history; once the user has been quiet for a
moment (or on f4) the model suggests the edit they will make next near the cursor, shown as a
diff under the editor; tab applies it (one undo step), escape dismisses it, typing clears it.

Structure: the app owns the file and the request; `EditorArea` owns the text and the ghost region;
model work runs in thread workers that post the core's `Step`/`Done` events back as messages, so
the UI never waits on the model.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Footer
from textual.worker import get_current_worker

from dg_edit.edits import TextEdit
from dg_edit.events import Done, Step

from . import files
from .canvas_panel import CanvasPanel
from .dialogs import ConfirmScreen, MessageScreen, RewriteRequest, RewriteScreen
from .edit_feed import changed_edits
from .editor import EditorArea
from .ghost import clean_model_text, diff_counts, diff_segments, step_segments
from .next_edit_panel import NextEditPanel, Suggestion
from .status import StatusLine

# file suffix -> tree-sitter language shipped with textual[syntax]
LANGUAGES = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".rs": "rust", ".go": "go",
    ".java": "java", ".json": "json", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".md": "markdown",
    ".html": "html", ".htm": "html", ".css": "css", ".sh": "bash", ".bash": "bash", ".sql": "sql", ".xml": "xml",
}


def language_for(path: Path) -> str | None:
    """The syntax-highlighting language for `path`, if its tree-sitter grammar is installed."""
    name = LANGUAGES.get(path.suffix.lower())
    if name is None or importlib.util.find_spec("tree_sitter") is None:
        return None
    return name if importlib.util.find_spec(f"tree_sitter_{name}") is not None else None


def _consume(make_events: Callable[[], Iterator[Step | Done]], on_event: Callable[[Step | Done], None]) -> None:
    """Run an engine stream in the current worker thread, handing each event to `on_event`, until it ends
    or the worker is cancelled (within one step); the stream is closed either way, so the engine stops."""
    worker = get_current_worker()
    events = make_events()
    try:
        for event in events:
            if worker.is_cancelled:
                break
            on_event(event)
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


class ModelEvent(Message):
    """A `Step` or `Done` of request `request_id`, posted from the model worker."""

    def __init__(self, request_id: int, event: Step | Done):
        super().__init__()
        self.request_id = request_id
        self.event = event


class StepReady(Message):
    """A newer `Step` waits in the app's `StepMailbox` (one message however many steps arrive meanwhile)."""


class StepMailbox:
    """Holds only the newest `Step`: when drawing a step costs more than computing one (a large file
    re-highlights on every edit), the screen skips to the latest draft instead of falling behind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._item: tuple[int, Step] | None = None

    def put(self, request_id: int, step: Step) -> bool:
        """Store the step; True when the box was empty, i.e. the UI needs a `StepReady` message."""
        with self._lock:
            was_empty = self._item is None
            self._item = (request_id, step)
            return was_empty

    def take(self) -> tuple[int, Step] | None:
        with self._lock:
            item, self._item = self._item, None
            return item


class ModelFailed(Message):
    def __init__(self, request_id: int, error: str):
        super().__init__()
        self.request_id = request_id
        self.error = error


class NextEditDone(Message):
    """The engine's next-edit answer for the buffer as it was at change `version`."""

    def __init__(self, version: int, text: str, done: Done, asked: bool):
        super().__init__()
        self.version = version
        self.text = text
        self.done = done
        self.asked = asked  # f4 (say when there is nothing) rather than the quiet timer


class NextEditFailed(Message):
    def __init__(self, version: int, error: str):
        super().__init__()
        self.version = version
        self.error = error


class EngineReady(Message):
    def __init__(self, engine: Any):
        super().__init__()
        self.engine = engine


class EngineFailed(Message):
    def __init__(self, error: str):
        super().__init__()
        self.error = error


@dataclass
class Request:
    id: int
    kind: str  # infill / rewrite


class DgEditApp(App[int]):
    """The editor. Give it an `engine` (anything with `stream`/`stream_rewrite`) or a `load_engine`."""

    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses elsewhere find it too
    TITLE = "dg-edit"
    ENABLE_COMMAND_PALETTE = False

    # Keys that act on the text are ordinary bindings, so they run after the editor has handled every
    # key typed before them (a priority binding would overtake keystrokes still queued in the editor).
    # tab/escape/ctrl+z must beat the editor's own meaning, so they are priority bindings that only
    # act while a proposal is pending (see `check_action`).
    BINDINGS = [
        Binding("ctrl+space,ctrl+@,f2", "infill", "Infill"),
        Binding("ctrl+r", "rewrite", "Rewrite sel."),
        Binding("tab", "accept", "Accept", priority=True),
        Binding("escape", "reject", "Reject", priority=True),
        Binding("ctrl+z", "reject", "Reject", show=False, priority=True),
        Binding("f3", "toggle_canvas", "Canvas"),
        Binding("f4", "next_edit", "Next edit"),
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+q", "quit", "Quit"),
    ]

    phase: reactive[str] = reactive("opening")  # then loading model, ready / no model, infill: ..., rewrite: ...
    dirty: reactive[bool] = reactive(False)
    show_canvas: reactive[bool] = reactive(False)

    def __init__(self, path: str | Path, *, engine: Any = None, load_engine: Callable[[], Any] | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        self.engine = engine
        self._load_engine = load_engine
        self.loaded: files.Fingerprint | None = None  # the file on disk when loaded / last saved
        self.saved_text: str | None = None  # None until a file is open
        self.lossy: str | None = None  # why saving would change bytes the user did not edit
        self.request: Request | None = None
        self._request_ids = 0
        self._steps = StepMailbox()
        # next edit: the committed text last seen (what the next change is diffed against), a counter
        # of changes (an answer for an older one is dropped), the quiet timer
        self._seen_text: str | None = None
        self._text_version = 0
        self._next_edit_timer = None

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield EditorArea("", language=language_for(self.path), id="editor")
        yield NextEditPanel(id="next-edit")
        yield CanvasPanel(decode=self._decode, id="canvas")
        yield StatusLine(id="status")
        yield Footer()

    @property
    def editor(self) -> EditorArea:
        return self.query_one("#editor", EditorArea)

    @property
    def status(self) -> StatusLine:
        return self.query_one("#status", StatusLine)

    @property
    def next_edit_panel(self) -> NextEditPanel:
        return self.query_one("#next-edit", NextEditPanel)

    @property
    def suggestion(self) -> Suggestion | None:
        return self.next_edit_panel.suggestion

    @property
    def canvas_panel(self) -> CanvasPanel:
        return self.query_one("#canvas", CanvasPanel)

    def on_mount(self) -> None:
        self.status.file_label = self.path.name or str(self.path)
        self.sub_title = str(self.path)
        self.editor.read_only = True  # until the file is open
        self._open_file()

    # ------------------------------------------------------------------ reactives
    def watch_phase(self, phase: str) -> None:
        self.status.phase = phase
        self.refresh_bindings()

    def watch_dirty(self, dirty: bool) -> None:
        self.status.dirty = dirty

    def watch_show_canvas(self, show: bool) -> None:
        self.canvas_panel.display = show

    def say(self, message: str, *, error: bool = False) -> None:
        """Put a message on the status line; errors also pop up as a notification."""
        self.status.message = message
        self.status.error = error
        if error:
            self.notify(message, title="dg-edit", severity="error", timeout=8)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Proposal keys only act while a proposal is pending on the main screen; else the editor gets them."""
        if action in ("accept", "reject"):
            pending = self.editor.proposal is not None or self.suggestion is not None
            return self.saved_text is not None and pending and len(self.screen_stack) == 1
        if action in ("infill", "rewrite", "save", "next_edit"):
            return len(self.screen_stack) == 1 and self.saved_text is not None
        return True

    # ------------------------------------------------------------------ the file
    def _open_file(self) -> None:
        try:
            loaded = files.load_text(self.path)
        except files.FileProblem as problem:
            if problem.kind == "missing":
                self.push_screen(ConfirmScreen(f"{self.path} does not exist.\nCreate it?",
                                               [("create", "Create"), ("quit", "Quit")]), self._after_missing)
            else:
                self.say(problem.message, error=True)
                self.push_screen(MessageScreen("Cannot open this file", problem.message, "Quit"),
                                 lambda _: self.exit(2, return_code=2))
            return
        self._set_buffer(loaded.text, loaded.fingerprint)
        if self.editor.text != loaded.text:
            # Textual's Document keeps one newline style and splits on form feeds & co.: say so now, ask at save.
            self.lossy = (f"{self.path.name} mixes line endings or has form-feed/separator characters; "
                          f"saving writes every line break as {self.editor.document.newline!r}")
            self.say(self.lossy, error=True)

    def _after_missing(self, choice: str | None) -> None:
        if choice == "create":
            self._set_buffer("", None)
            self.say("new file: it is created when you save (ctrl+s)")
        else:
            self.exit(2, return_code=2)

    def _set_buffer(self, text: str, fingerprint: files.Fingerprint | None) -> None:
        self.editor.load_text(text)
        self.editor.read_only = False
        self.loaded = fingerprint
        self.saved_text = text
        self.dirty = False
        self.editor.focus()
        self.refresh_bindings()
        # The model loads only once there is a file to edit: a file that cannot be opened quits at once.
        if self.engine is not None:
            self.phase = "ready"
            self._prefill()
        elif self._load_engine is not None:
            self.phase = "loading model"
            self.load_model()
        else:
            self.phase = "no model"

    def on_text_area_changed(self, event: EditorArea.Changed) -> None:
        if self.saved_text is not None:
            text = self.editor.committed_text()
            self.dirty = text != self.saved_text
            self._prefill(text)
            self._record_edits(text)

    # ------------------------------------------------------------------ next edit
    def _record_edits(self, text: str) -> None:
        """A change to the user's text: into the engine's edit history, any suggestion is gone, and once
        the user is quiet the next edit is asked for (and prepared by the engine meanwhile)."""
        seen, self._seen_text = self._seen_text, text
        if seen is None or seen == text:
            return  # the file just loaded, or a draft changed (not the user's text)
        self._text_version += 1
        self._show_suggestion(None)
        record = getattr(self.engine, "record_edit", None)
        prepare = getattr(self.engine, "prepare_next_edit", None)
        try:
            if record is not None:
                for edit in changed_edits(seen, text):
                    record(self._session, edit)
            if prepare is not None and self.editor.proposal is None:
                prepare(self._session, text, self._cursor_index())
        except Exception as e:  # a service that went away (--connect): shown; the buffer is the user's still
            self.say(f"edit history not sent: {e}", error=True)
        if self._next_edit_timer is not None:
            self._next_edit_timer.stop()
        settings = getattr(self.engine, "settings", None)
        quiet_ms = settings.idle_prefill_ms if settings is not None else 500
        self._next_edit_timer = self.set_timer(max(quiet_ms, 50) / 1000.0, lambda: self._ask_next_edit(False))

    def _show_suggestion(self, suggestion: Suggestion | None) -> None:
        self.next_edit_panel.suggestion = suggestion
        self.editor.tab_yields = suggestion is not None

    def _cursor_index(self) -> int:
        return self.editor.document.get_index_from_location(self.editor.selection.end)

    def action_next_edit(self) -> None:
        self._ask_next_edit(True)

    def _ask_next_edit(self, asked: bool) -> None:
        """Ask the engine for the next edit at the cursor (skipped while a proposal or request is on)."""
        stream = getattr(self.engine, "stream_next_edit", None)
        if stream is None or self.editor.proposal is not None or self.request is not None:
            if asked:
                self.say("next edit: " + ("no model is loaded" if self.engine is None else
                                          "this model does not suggest edits" if stream is None else
                                          "finish the pending proposal first"))
            return
        text, cursor, session = self.editor.text, self._cursor_index(), self._session
        if asked:
            self.say("next edit: asking the model")
        self.run_next_edit(self._text_version, text, lambda: stream(text, cursor, session=session), asked)

    @work(thread=True, exclusive=True, group="next_edit", exit_on_error=False)
    def run_next_edit(self, version: int, text: str, make_events: Callable[[], Iterator[Step | Done]],
                      asked: bool) -> None:
        """The engine's next-edit stream off the UI thread; only its `Done` matters to the panel."""
        def on_event(event: Step | Done) -> None:
            if isinstance(event, Done):
                self.post_message(NextEditDone(version, text, event, asked))

        try:
            _consume(make_events, on_event)
        except Exception as e:  # shown on the status line; the buffer is never touched
            self.post_message(NextEditFailed(version, str(e) or type(e).__name__))

    def on_next_edit_done(self, message: NextEditDone) -> None:
        if message.version != self._text_version or self.editor.proposal is not None:
            return  # the text moved on (or a proposal is pending): the answer is for text that is gone
        edits = message.done.edits
        if not edits:
            if message.asked:
                self.say("next edit: the model suggests nothing here")
            return
        self._show_suggestion(Suggestion(edits[0], message.text))
        ms = " (prepared)" if message.done.prepared else f" ({message.done.ms:.0f} ms)"
        self.say(f"next edit suggested at line {self.suggestion.line}{ms}: tab applies · escape dismisses")

    def on_next_edit_failed(self, message: NextEditFailed) -> None:
        if message.version == self._text_version:
            self.say(f"next edit failed, buffer unchanged: {message.error}", error=True)

    def _apply_suggestion(self) -> None:
        suggestion = self.suggestion
        self._show_suggestion(None)
        editor = self.editor
        if suggestion is None or editor.text != suggestion.text:
            return
        edit: TextEdit = suggestion.edit
        doc = editor.document
        start, end = doc.get_location_from_index(edit.start), doc.get_location_from_index(edit.end)
        editor.history.checkpoint()
        editor.replace(edit.text, start, end, maintain_selection_offset=False)
        editor.history.checkpoint()
        self.say(f"next edit applied at line {suggestion.line} (ctrl+z undoes it)")

    def _prefill(self, text: str | None = None) -> None:
        """Tell an in-process engine the buffer's text: it encodes it while the user is idle, so an
        infill anywhere starts warm. (A `--connect` engine learns the text from each request.)"""
        prefill = getattr(self.engine, "prefill", None)
        if prefill is not None and self.saved_text is not None:
            prefill(self._session, self.editor.committed_text() if text is None else text)

    @property
    def _session(self) -> str:
        return str(self.path.resolve())

    def action_save(self) -> None:
        self._save_flow()

    def _save_flow(self, then: Callable[[], None] | None = None) -> None:
        """Save, asking first when that would change bytes the user did not edit or overwrite someone
        else's version of the file; `then` runs once the file is saved."""
        def overwrite_check(choice: str | None = "save") -> None:
            if choice != "save":
                self.say("not saved")
            elif files.changed_on_disk(self.path, self.loaded):
                self.push_screen(ConfirmScreen(f"{self.path} changed on disk since it was opened.\n"
                                               "Overwrite it with this buffer?",
                                               [("overwrite", "Overwrite"), ("cancel", "Cancel")]), write)
            else:
                write("save")

        def write(choice: str | None) -> None:
            if choice not in ("save", "overwrite"):
                self.say("not saved")
            elif self._save() and then is not None:
                then()

        if self.lossy is not None:
            self.push_screen(ConfirmScreen(f"{self.lossy}.\nSave anyway?", [("save", "Save"), ("cancel", "Cancel")]),
                             overwrite_check)
        else:
            overwrite_check()

    def _save(self) -> bool:
        text = self.editor.committed_text()  # never a proposal the user has not accepted
        try:
            self.loaded = files.atomic_write(self.path, text)
        except OSError as e:
            self.say(f"save failed, the buffer is kept: {e.strerror or e}", error=True)
            return False
        self.saved_text = text
        self.lossy = None
        self.dirty = self.editor.committed_text() != text
        note = " (the pending proposal was not saved)" if self.editor.proposal is not None else ""
        self.say(f"saved {len(text.encode('utf-8'))} bytes{note}")
        return True

    async def action_quit(self) -> None:
        if self.saved_text is not None and self.editor.committed_text() != self.saved_text:
            self.push_screen(ConfirmScreen("There are unsaved changes.",
                                           [("save", "Save and quit"), ("discard", "Quit without saving"),
                                            ("cancel", "Cancel")]), self._after_quit_question)
            return
        self.cancel_request()
        self.exit(0)

    def _after_quit_question(self, choice: str | None) -> None:
        if choice == "save":
            self._save_flow(then=lambda: self.exit(0))
        elif choice == "discard":
            self.cancel_request()
            self.exit(0)

    # ------------------------------------------------------------------ the model
    @work(thread=True, group="load", exit_on_error=False)
    def load_model(self) -> None:
        try:
            engine = self._load_engine()
        except Exception as e:  # any loader failure is shown; the file stays editable
            self.post_message(EngineFailed(str(e) or type(e).__name__))
            return
        self.post_message(EngineReady(engine))

    def on_engine_ready(self, message: EngineReady) -> None:
        self.engine = message.engine
        self.phase = "ready"
        self._prefill()

    def on_engine_failed(self, message: EngineFailed) -> None:
        self.phase = "no model"
        self.say(f"model not loaded: {message.error}", error=True)

    def _decode(self, ids: Sequence[int]) -> list[str]:
        tok = getattr(self.engine, "tokenizer", None)
        return [tok.decode([i]) for i in ids] if tok is not None else ["?" for _ in ids]

    def _suffix_head(self, suffix: str) -> tuple[int, ...]:
        """The suffix tokens the engine may clamp at the end of the canvas (the canvas panel marks them)."""
        tok = getattr(self.engine, "tokenizer", None)
        settings = getattr(self.engine, "settings", None)
        if tok is None or settings is None or not suffix:
            return ()
        n = settings.suffix_head_tokens
        return tuple(tok.encode(suffix[: max(n, 1) * 16], add_special_tokens=False)[:n])

    def _can_start(self) -> bool:
        if self.engine is None:
            self.say("the model is not loaded yet" if self.phase == "loading model" else "no model is loaded",
                     error=self.phase != "loading model")
            return False
        if self.editor.proposal is not None:
            self.say("a proposal is pending: tab accepts it, escape rejects it")
            return False
        self._show_suggestion(None)  # the user asked for something else
        self.workers.cancel_group(self, "next_edit")
        return True

    def action_infill(self) -> None:
        if not self._can_start():
            return
        editor = self.editor
        doc = editor.document
        cursor = editor.selection.end
        prefix, suffix = doc.get_text_range(doc.start, cursor), doc.get_text_range(cursor, doc.end)
        editor.begin_proposal("infill", cursor, cursor)
        engine, session = self.engine, self._session
        self._start("infill", suffix, lambda: engine.stream(prefix, suffix, session=session))

    def action_rewrite(self) -> None:
        if not self._can_start():
            return
        selection = self.editor.selection
        if selection.is_empty:
            self.say("select the text to rewrite first, then press ctrl+r")
            return
        self.push_screen(RewriteScreen(), lambda req: self._start_rewrite(selection, req))

    def _start_rewrite(self, selection, req: RewriteRequest | None) -> None:
        if req is None or self.editor.proposal is not None:
            self.say("rewrite cancelled")
            return
        editor = self.editor
        doc = editor.document
        start, end = sorted(selection)
        prefix, chosen, suffix = (doc.get_text_range(doc.start, start), doc.get_text_range(start, end),
                                  doc.get_text_range(end, doc.end))
        editor.selection = selection
        editor.begin_proposal("rewrite", start, end)
        editor.show_segments(diff_segments(chosen, chosen))  # the selection, styled as part of the proposal
        engine, session = self.engine, self._session
        self._start("rewrite", suffix, lambda: engine.stream_rewrite(
            prefix, chosen, suffix, instruction=req.instruction, strength=req.strength, session=session))

    def _start(self, kind: str, suffix: str, make_events: Callable[[], Iterator[Step | Done]]) -> None:
        self._request_ids += 1
        self.request = Request(id=self._request_ids, kind=kind)
        self.canvas_panel.suffix_head = self._suffix_head(suffix)
        self.phase = f"{kind}: denoising"
        self.status.progress = ""
        self.say("escape cancels")
        self.run_model(self.request.id, make_events)

    @work(thread=True, exclusive=True, group="model", exit_on_error=False)
    def run_model(self, request_id: int, make_events: Callable[[], Iterator[Step | Done]]) -> None:
        """Iterate the engine's stream off the UI thread; stop within one step once cancelled."""
        def on_event(event: Step | Done) -> None:
            if isinstance(event, Step):
                if self._steps.put(request_id, event):
                    self.post_message(StepReady())
            else:
                self.post_message(ModelEvent(request_id, event))

        try:
            _consume(make_events, on_event)
        except Exception as e:  # the boundary between the model and the user: reported, buffer restored
            self.post_message(ModelFailed(request_id, str(e) or type(e).__name__))

    def cancel_request(self) -> None:
        """Stop the running request (if any); its late events are ignored by id."""
        if self.request is not None:
            self.workers.cancel_group(self, "model")
            self.request = None

    def on_step_ready(self, message: StepReady) -> None:
        item = self._steps.take()
        if item is not None:
            self.on_model_event(ModelEvent(*item))

    def on_model_event(self, message: ModelEvent) -> None:
        request, editor = self.request, self.editor
        if request is None or message.request_id != request.id or editor.proposal is None:
            return  # a cancelled or superseded request
        event = message.event
        if isinstance(event, Step):
            editor.show_segments(step_segments(event))
            self.canvas_panel.step = event
            # tokens so far / forwards so far: Done's tokens_per_forward if the request stopped here
            accepted = sum(t.accepted for t in event.tokens)
            self.status.progress = (f"step {event.index}/{event.total} · {len(event.ids) / max(event.index, 1):.2f} "
                                    f"tok/fwd · {accepted}/{len(event.tokens)} accepted · {event.ms:.0f} ms")
            return
        self.request = None
        proposal = editor.proposal
        proposal.final = final = clean_model_text(event.text)
        self.status.progress = ("typed ahead: the rest of the last answer, no model call" if event.typed_ahead else
                                f"{event.steps} steps · {event.tokens_per_forward:.2f} tok/fwd · {event.ms:.0f} ms")
        if request.kind == "infill":
            if not final:
                editor.reject()
                self.phase = "ready"
                self.say("the model proposed nothing here")
                return
            editor.show_segments(diff_segments("", final))
        else:
            segments = diff_segments(proposal.original, final)
            editor.show_segments(segments)
            ins, dele = diff_counts(segments)
            self.status.progress += f" · +{ins} −{dele} chars"
        self.phase = f"{request.kind}: review"
        self.say("tab accepts · escape rejects")

    def on_model_failed(self, message: ModelFailed) -> None:
        if self.request is None or message.request_id != self.request.id:
            return
        self.request = None
        self.editor.reject()
        self.phase = "ready"
        self.say(f"model error, buffer unchanged: {message.error}", error=True)

    # ------------------------------------------------------------------ deciding
    def action_accept(self) -> None:
        editor = self.editor
        if editor.proposal is None:
            self._apply_suggestion()
            return
        if editor.proposal.final is None:
            self.say("still denoising: wait for it to finish, or escape to cancel")
            return
        kind = editor.proposal.kind
        editor.accept()
        self.phase = "ready"
        self.say(f"{kind} accepted (ctrl+z undoes it)")

    def action_reject(self) -> None:
        editor = self.editor
        if editor.proposal is None:
            if self.suggestion is not None:
                self._show_suggestion(None)
                self.say("next edit dismissed")
            return
        running = self.request is not None
        self.cancel_request()
        editor.reject()
        self.phase = "ready"
        self.say("request cancelled, buffer unchanged" if running else "proposal rejected")

    def action_toggle_canvas(self) -> None:
        self.show_canvas = not self.show_canvas


KEYS_HELP = """keys:
  ctrl+space, f2   infill at the cursor (the draft refines in place as ghost text)
  ctrl+r           rewrite the selection (asks for an optional instruction and a strength)
  tab / escape     accept / reject the proposal (escape also cancels a running request)
  f4               suggest the next edit now (also asked for by itself when you pause after a change);
                   tab applies it, escape dismisses it
  ctrl+z           undo (an accepted proposal is one undo step)
  f3               show or hide the canvas panel
  ctrl+s / ctrl+q  save (atomically) / quit (asks when there are unsaved changes)"""


def build_parser() -> argparse.ArgumentParser:
    from dg_edit.startup import add_model_arguments

    parser = argparse.ArgumentParser(
        prog="dg-edit tui", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Terminal editor: infill and rewrite code with the diffusion model, watching it refine.",
        epilog=KEYS_HELP)
    parser.add_argument("file", help="the file to edit (you are offered to create it if it does not exist)")
    parser.add_argument("--connect", metavar="WS_URL", default=None,
                        help="drive a running `dg-edit serve` (e.g. ws://127.0.0.1:8765/ws) instead of loading "
                             "a model in this process")
    parser.add_argument("--token", default=None,
                        help="token of the service for --connect (default: $DG_EDIT_TOKEN)")
    add_model_arguments(parser)
    return parser


def engine_loader(args: argparse.Namespace) -> Callable[[], Any]:
    """What the app calls (in a worker) to get its engine: a remote one for --connect, else a local model."""
    if args.connect:
        import os

        from dg_edit.startup import settings_from_args
        from dg_edit.config import TOKEN_ENV

        from .remote import RemoteEngine

        token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
        document = str(Path(args.file).resolve())  # the file's one name, whatever the working directory
        return lambda: RemoteEngine(args.connect, token, settings=settings_from_args(args), document=document).connect()
    from dg_edit.startup import load_engine

    return lambda: load_engine(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    app = DgEditApp(args.file, load_engine=engine_loader(args))
    result = app.run()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
