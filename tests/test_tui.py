"""The TUI driven like a person drives it: Textual's pilot presses keys in the real app, which runs
the real model (the `engine` fixture) in its workers. Every test checks what the user would see
and what ends up in the buffer and on disk."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from dg_edit import Step
from dg_edit.tui.app import DgEditApp
from dg_edit.tui.dialogs import ConfirmScreen, MessageScreen, RewriteScreen
from tui_pilot import SIZE, SOURCE, infill_at, proposal_styles, split, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def source_file(tmp_path) -> Path:
    p = tmp_path / "example.py"
    p.write_text(SOURCE, encoding="utf-8")
    return p


class GatedEngine:
    """The real engine, but each Step waits until the test lets it through: the test can look at the
    screen between steps, and cancel in the middle of a request."""

    def __init__(self, engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.settings = engine.settings
        self.gate = threading.Semaphore(0)
        self.steps_sent = 0
        self.closed = threading.Event()

    def _gated(self, events):
        try:
            for event in events:  # every event waits, the final Done too: a one-step answer is still seen
                if not self.gate.acquire(timeout=60):
                    raise TimeoutError("test never released the event")
                self.steps_sent += isinstance(event, Step)
                yield event
        finally:
            self.closed.set()

    def stream(self, *args, **kwargs):
        return self._gated(self.engine.stream(*args, **kwargs))

    def stream_rewrite(self, *args, **kwargs):
        return self._gated(self.engine.stream_rewrite(*args, **kwargs))


class FailingEngine:
    """The real engine, failing after `after` denoising steps as a broken model would."""

    def __init__(self, engine, after: int = 2):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.settings = engine.settings
        self.after = after
        self.steps_sent = 0

    def _failing(self, events):
        for event in events:
            if self.steps_sent == self.after:
                raise RuntimeError("simulated failure in the middle of the canvas")
            self.steps_sent += 1
            yield event

    def stream(self, *args, **kwargs):
        return self._failing(self.engine.stream(*args, **kwargs))

    def stream_rewrite(self, *args, **kwargs):
        return self._failing(self.engine.stream_rewrite(*args, **kwargs))


# ---------------------------------------------------------------------------------------------- infill
async def test_infill_refines_in_place_step_by_step_and_tab_accepts(source_file, engine):
    gated = GatedEngine(engine)
    app = DgEditApp(source_file, engine=gated)
    prefix, suffix = split(SOURCE, 8, 4)
    async with app.run_test(size=SIZE) as pilot:
        editor = app.editor
        for _attempt in range(6):  # an empty middle is a legitimate answer: then ask again
            editor.move_cursor((8, 4))  # the start of main's body
            await pilot.press("ctrl+space")
            await wait_for(pilot, lambda: app.request is not None, what="the request to start")
            assert app.phase == "infill: denoising"
            shown = 0
            for n in (1, 2, 3):  # look at the screen after each of the first steps (fewer if the model stops early)
                gated.gate.release()
                await wait_for(pilot, lambda: app.status.progress.startswith(f"step {n}/") or app.request is None,
                               what=f"step {n}")
                if app.request is None:
                    break
                shown += 1
                # the draft is in place, but the user's text is untouched
                assert editor.committed_text() == SOURCE
                proposal = editor.proposal
                assert editor.text == prefix + editor.get_text_range(proposal.start, proposal.end) + suffix
                assert "tok/fwd" in app.status.progress and " ms" in app.status.progress
                assert app.canvas_panel.step.index == n
                if proposal.start != proposal.end:  # the draft is painted as a proposal, token by token
                    assert set(proposal_styles(editor)) <= {"settled", "tentative", "faint"}
                    assert proposal_styles(editor)
            assert app.canvas_panel.step is not None, "no step was shown before the result"
            for _ in range(200):
                gated.gate.release()
            await wait_for(pilot, lambda: app.request is None, what="Done")
            if editor.proposal is not None:
                break
        assert shown >= 1
        final = editor.proposal.final
        assert final
        assert app.phase == "infill: review"
        assert "steps" in app.status.progress and "tok/fwd" in app.status.progress
        assert not app.dirty
        await pilot.press("tab")
        await pilot.pause()
        assert editor.proposal is None
        assert editor.text == prefix + final + suffix
        assert app.dirty
        assert source_file.read_text() == SOURCE  # accepting does not save


async def test_reject_restores_the_buffer_exactly(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        editor = app.editor
        editor.move_cursor((7, 0))
        await infill_at(pilot, app, (8, 4), key="f2")
        assert editor.proposal is not None and editor.proposal.final
        assert editor.text != SOURCE  # the proposal is on screen
        await pilot.press("escape")
        await pilot.pause()
        assert editor.proposal is None
        assert editor.text == SOURCE
        assert editor.selection.end == (8, 4)
        assert not app.dirty
        assert app.status.message == "proposal rejected"


async def test_typing_the_start_of_a_rejected_proposal_brings_the_rest_at_once(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        editor = app.editor
        for _attempt in range(10):  # an answer with something left after its first two characters
            await infill_at(pilot, app, (8, 4))
            final = editor.proposal.final
            await pilot.press("escape")
            await pilot.pause()
            if final[:2].strip() and final[2:].strip():
                break
        else:
            pytest.fail("no proposal of three characters or more in ten tries")
        assert "steps ·" in app.status.progress
        editor.move_cursor((8, 4))
        editor.insert(final[:2])  # the user types what they were shown
        await pilot.press("ctrl+space")
        await wait_for(pilot, lambda: editor.proposal is not None and editor.proposal.final is not None,
                       what="the typed-ahead answer")
        assert editor.proposal.final == final[2:]
        assert app.status.progress.startswith("typed ahead")
        await pilot.press("tab")
        await pilot.pause()
        prefix, suffix = split(SOURCE, 8, 4)
        assert editor.text == prefix + final + suffix


async def test_the_open_file_is_prefilled_while_the_user_is_idle(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    session = str(source_file.resolve())

    def prefilled() -> bool:
        info = engine.cache_info()
        return info["prefill"]["pending"] == 0 and any(d["session"] == session for d in info["documents"])

    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, prefilled, what="idle prefill of the open file")
        tokens = next(d["tokens"] for d in engine.cache_info()["documents"] if d["session"] == session)
        assert tokens >= len(engine.tokenizer.encode(SOURCE, add_special_tokens=False))
        app.editor.move_cursor((1, 0))
        app.editor.insert("import sys\n")  # an edit: prefilled again once the user stops
        passes = engine.cache_info()["prefill"]["passes"]
        await wait_for(pilot, lambda: engine.cache_info()["prefill"]["passes"] > passes and prefilled(),
                       what="prefill after the edit")


async def test_ctrl_z_undoes_an_accepted_proposal(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        editor = app.editor
        await pilot.press("x")  # the user's own edit before the proposal stays in history
        typed = editor.text
        await infill_at(pilot, app, (8, 4))
        await pilot.press("tab")
        await pilot.pause()
        assert editor.text != typed
        await pilot.press("ctrl+z")
        await pilot.pause()
        assert editor.text == typed  # one undo takes back exactly the proposal
        await pilot.press("ctrl+z")
        await pilot.pause()
        assert editor.text == SOURCE


async def test_cancel_while_denoising_restores_buffer_and_stops_the_model(source_file, engine):
    gated = GatedEngine(engine)
    app = DgEditApp(source_file, engine=gated)
    async with app.run_test(size=SIZE) as pilot:
        editor = app.editor
        editor.move_cursor((8, 4))
        await pilot.press("ctrl+space")
        gated.gate.release()
        await wait_for(pilot, lambda: app.status.progress.startswith("step 1/"), what="the first step")
        assert editor.proposal is not None and app.request is not None
        source_file.write_text("")  # so that the save below really writes
        await pilot.press("ctrl+s")  # saving mid-request writes the user's text, never the draft
        await pilot.click("#choice-overwrite")
        await pilot.pause()
        assert source_file.read_text() == SOURCE
        assert app.request is not None  # saving did not disturb the request
        await pilot.press("escape")
        await pilot.pause()
        assert editor.text == SOURCE
        assert editor.proposal is None
        assert "cancelled" in app.status.message
        gated.gate.release()  # the worker sees the cancellation at its next event and closes the stream
        await wait_for(pilot, gated.closed.is_set, what="the engine stream to close")
        await pilot.pause(0.2)
        assert gated.steps_sent <= 2
        assert editor.text == SOURCE


async def test_typing_is_refused_while_a_proposal_is_pending(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        editor = app.editor
        await infill_at(pilot, app, (8, 4))
        shown = editor.text
        await pilot.press("a", "b", "backspace", "enter")
        await pilot.pause()
        assert editor.text == shown
        assert editor.committed_text() == SOURCE


async def test_canvas_panel_toggles_and_shows_the_canvas(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        panel = app.canvas_panel
        assert not panel.display
        await pilot.press("f3")
        assert panel.display
        await infill_at(pilot, app, (8, 4))
        step = panel.step
        assert isinstance(step, Step) and step.canvas
        shown = str(panel.render_step(step))
        assert f"step {step.index}/{step.total}" in shown
        assert f"{len(step.canvas)} positions" in shown
        await pilot.press("f3")
        assert not panel.display


async def test_python_is_highlighted_with_line_numbers(source_file):
    app = DgEditApp(source_file)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        editor = app.editor
        assert editor.show_line_numbers
        assert editor.language == "python" and editor.is_syntax_aware  # needs textual[syntax] (tree-sitter)
        editor.move_cursor((2, 0))
        await pilot.pause()
        cells = [(ch, seg.style.color) for seg in editor.render_line(0) for ch in seg.text]  # "1  import os"
        line = "".join(ch for ch, _ in cells)
        assert line.lstrip().startswith("1  import os")
        keyword, name = cells[line.index("import") + 2][1], cells[line.index(" os") + 1][1]
        assert keyword != name  # the keyword has its own colour


async def test_drafts_keep_the_code_below_highlighted_and_reject_restores_the_display(tmp_path):
    """Drafts shift the syntax highlights instead of re-querying the whole tree (see EditorArea); what
    is drawn below the draft keeps its colours, and after a reject every line is drawn as before."""
    from dg_edit.tui.ghost import Segment

    p = tmp_path / "m.py"
    p.write_text(SOURCE)
    app = DgEditApp(p)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        editor = app.editor
        editor.cursor_blink = False

        def drawn(row_range):
            return [[(seg.text, seg.style) for seg in editor.render_line(y)] for y in row_range]

        def colour_of(y, word):
            cells = [(ch, seg.style.color) for seg in editor.render_line(y) for ch in seg.text]
            line = "".join(ch for ch, _ in cells)
            return cells[line.index(word)][1]

        editor.move_cursor((2, 0))
        await pilot.pause()
        before = drawn(range(12))
        def_colour = colour_of(7, "def main")
        editor.begin_proposal("infill", (2, 0), (2, 0))
        for n in range(1, 4):  # drafts of 1, 2, 3 extra lines: the code below moves down
            editor.show_segments([Segment("x = 1\n" * n, "faint")])
            await pilot.pause()
            assert colour_of(7 + n, "def main") == def_colour
        editor.reject()
        await pilot.pause()
        assert editor.text == SOURCE
        assert drawn(range(12)) == before


# ---------------------------------------------------------------------------------------------- rewrite
async def test_rewrite_shows_a_diff_then_tab_applies_and_ctrl_z_undoes(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        editor = app.editor
        editor.selection = ((3, 0), (4, 16))
        original = editor.selected_text
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert isinstance(app.screen, RewriteScreen)
        await pilot.press(*"add docs")
        strength = app.screen.query_one("#strength")
        strength.value = "1"
        strength.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: editor.proposal is not None and editor.proposal.final is not None
                       or app.request is None and editor.proposal is None, what="the rewrite")
        proposal = editor.proposal
        assert proposal.kind == "rewrite" and proposal.original == original
        assert app.phase == "rewrite: review"
        assert "chars" in app.status.progress  # +inserted −deleted
        if proposal.final != original:  # shown as a diff: what goes and what comes
            assert {"deleted", "inserted"} & set(proposal_styles(editor))
        assert editor.committed_text() == SOURCE
        final = proposal.final
        await pilot.press("tab")
        await pilot.pause()
        prefix, rest = SOURCE.split(original, 1)
        assert editor.text == prefix + final + rest
        await pilot.press("ctrl+z")
        await pilot.pause()
        assert editor.text == SOURCE


async def test_rewrite_with_strength_zero_keeps_the_selection(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        editor = app.editor
        editor.selection = ((3, 4), (3, 7))
        await pilot.press("ctrl+r")
        await pilot.pause()
        app.screen.query_one("#strength").value = "0"
        app.screen.query_one("#strength").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: editor.proposal is not None and editor.proposal.final is not None,
                       what="the rewrite")
        assert editor.proposal.final == "add"
        await pilot.press("tab")
        await pilot.pause()
        assert editor.text == SOURCE
        assert not app.dirty


async def test_rewrite_dialog_rejects_a_bad_strength_and_escape_cancels(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        editor = app.editor
        editor.selection = ((3, 0), (3, 7))
        await pilot.press("ctrl+r")
        await pilot.pause()
        screen = app.screen
        screen.query_one("#strength").value = "2"
        screen.query_one("#strength").focus()
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen is screen  # still asking
        assert "between 0 and 1" in str(screen.query_one("#rewrite-error").render())
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, RewriteScreen)
        assert editor.proposal is None and editor.text == SOURCE


async def test_rewrite_without_selection_says_what_to_do(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert not isinstance(app.screen, RewriteScreen)
        assert "select" in app.status.message


# ---------------------------------------------------------------------------------------------- model errors
async def test_model_failing_mid_canvas_leaves_the_buffer_identical(source_file, engine):
    failing = FailingEngine(engine, after=2)
    app = DgEditApp(source_file, engine=failing)
    async with app.run_test(size=SIZE) as pilot:
        editor = app.editor
        # main's empty body asks for a block: a single line can be decided in one step, before step 2
        editor.move_cursor((8, 4))
        await pilot.press("ctrl+space")
        await wait_for(pilot, lambda: "model error" in app.status.message, what="the error")
        assert failing.steps_sent == 2  # it did fail in the middle, after drafts were shown
        assert editor.text == SOURCE
        assert editor.proposal is None and not app.dirty
        assert "simulated failure" in app.status.message and app.status.error
        assert app.phase == "ready"
        # the editor is usable again
        await pilot.press("z")
        assert editor.text != SOURCE


async def test_model_failing_during_rewrite_leaves_the_buffer_identical(source_file, engine):
    app = DgEditApp(source_file, engine=FailingEngine(engine, after=1))
    async with app.run_test(size=SIZE) as pilot:
        editor = app.editor
        editor.selection = ((3, 0), (4, 16))
        await pilot.press("ctrl+r")
        await pilot.pause()
        app.screen.query_one("#strength").value = "1"
        app.screen.query_one("#strength").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: "model error" in app.status.message, what="the error")
        assert editor.text == SOURCE
        assert editor.selection == ((3, 0), (4, 16))


async def test_bad_request_is_reported_not_raised(tmp_path, engine):
    empty = tmp_path / "empty.py"
    empty.write_text("")
    app = DgEditApp(empty, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+space")
        await wait_for(pilot, lambda: "model error" in app.status.message, what="the error")
        assert "empty" in app.status.message
        assert app.editor.text == "" and app.editor.proposal is None


async def test_model_that_fails_to_load_is_shown_and_the_file_stays_editable(source_file):
    def load():
        raise FileNotFoundError("model directory not found: /nowhere")

    app = DgEditApp(source_file, load_engine=load)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == "no model", what="the load failure")
        assert "/nowhere" in app.status.message
        await pilot.press("ctrl+space")
        assert app.editor.proposal is None
        await pilot.press("q")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert source_file.read_text() == "q" + SOURCE


# ---------------------------------------------------------------------------------------------- saving
async def test_save_is_atomic_keeps_the_mode_and_never_writes_a_proposal(source_file, engine):
    source_file.chmod(0o640)
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        editor = app.editor
        await pilot.press("#", " ", "h", "i", "enter")
        assert app.dirty
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert source_file.read_text() == "# hi\n" + SOURCE
        assert stat.S_IMODE(source_file.stat().st_mode) == 0o640
        assert not app.dirty and "saved" in app.status.message
        assert sorted(os.listdir(source_file.parent)) == ["example.py"]  # no temporary file left behind
        # save while a proposal is pending: only the user's text goes to disk
        await infill_at(pilot, app, (9, 4))  # main's body, one line down after '# hi'
        assert editor.text != editor.committed_text()
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert source_file.read_text() == "# hi\n" + SOURCE
        assert "not saved" in app.status.message  # "(the pending proposal was not saved)"
        await pilot.press("tab")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert source_file.read_text() == editor.text
        assert stat.S_IMODE(source_file.stat().st_mode) == 0o640


async def test_failed_save_keeps_the_buffer_and_says_why(tmp_path, engine):
    folder = tmp_path / "project"
    folder.mkdir()
    path = folder / "a.py"
    path.write_text(SOURCE)
    app = DgEditApp(path, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("x")
        path.unlink()
        folder.rmdir()  # the folder vanished (unmounted, deleted): the save cannot happen
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)  # the file is gone from disk: that is a change too
        await pilot.click("#choice-overwrite")
        await pilot.pause()
        assert "save failed" in app.status.message and app.status.error
        assert app.editor.text == "x" + SOURCE and app.dirty


async def test_save_follows_a_symlink(tmp_path, engine):
    target = tmp_path / "real.py"
    target.write_text(SOURCE)
    link = tmp_path / "link.py"
    link.symlink_to(target)
    app = DgEditApp(link, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("x", "ctrl+s")
        await pilot.pause()
    assert link.is_symlink()
    assert target.read_text() == "x" + SOURCE


async def test_save_asks_before_overwriting_a_file_changed_on_disk(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("x")
        source_file.write_text("someone else's edit\n")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert "changed on disk" in app.screen.question
        await pilot.click("#choice-cancel")
        await pilot.pause()
        assert source_file.read_text() == "someone else's edit\n"
        await pilot.press("ctrl+s")
        await pilot.pause()
        await pilot.click("#choice-overwrite")
        await pilot.pause()
        assert source_file.read_text() == "x" + SOURCE
        await pilot.press("y", "ctrl+s")  # the new version on disk is ours now: no question
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        assert source_file.read_text() == "xy" + SOURCE


# ---------------------------------------------------------------------------------------------- quitting
async def test_quit_without_changes_exits_at_once(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert app.return_code == 0


async def test_quit_with_unsaved_changes_asks_first(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("x", "ctrl+q")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen) and "unsaved" in app.screen.question
        await pilot.press("escape")  # cancel: back to the editor, nothing lost
        await pilot.pause()
        assert app.is_running and app.editor.text == "x" + SOURCE
        await pilot.press("ctrl+q")
        await pilot.pause()
        await pilot.click("#choice-discard")
        await pilot.pause()
    assert app.return_code == 0
    assert source_file.read_text() == SOURCE


async def test_quit_can_save_first(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("x", "ctrl+q")
        await pilot.pause()
        await pilot.click("#choice-save")
        await pilot.pause()
    assert source_file.read_text() == "x" + SOURCE


async def test_save_and_quit_still_asks_about_a_file_changed_on_disk(source_file, engine):
    app = DgEditApp(source_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("x", "ctrl+q")
        await pilot.pause()
        source_file.write_text("someone else's edit\n")
        await pilot.click("#choice-save")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen) and "changed on disk" in app.screen.question
        await pilot.click("#choice-cancel")
        await pilot.pause()
        assert app.is_running and source_file.read_text() == "someone else's edit\n"
        await pilot.press("ctrl+q")
        await pilot.pause()
        await pilot.click("#choice-save")
        await pilot.pause()
        await pilot.click("#choice-overwrite")
        await pilot.pause()
    assert app.return_code == 0
    assert source_file.read_text() == "x" + SOURCE


@pytest.mark.parametrize("content", [b"a = 1\r\nb = 2\n", b"a = 1\n\x0c\nb = 2\n"])
async def test_line_endings_the_editor_would_change_are_announced_and_saving_asks(tmp_path, engine, content):
    p = tmp_path / "mixed.py"
    p.write_bytes(content)
    app = DgEditApp(p, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "line endings" in app.status.message and app.status.error
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen) and "Save anyway?" in app.screen.question
        await pilot.click("#choice-cancel")
        await pilot.pause()
        assert p.read_bytes() == content
        await pilot.press("ctrl+s")
        await pilot.pause()
        await pilot.click("#choice-save")
        await pilot.pause()
        assert p.read_bytes() == app.editor.text.encode()


# ---------------------------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("content,expected", [
    (b"caf\xe9 = 1\n", "not UTF-8"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00", "binary"),
])
async def test_unreadable_files_get_a_clear_message(tmp_path, content, expected):
    p = tmp_path / "bad.py"
    p.write_bytes(content)
    app = DgEditApp(p)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, MessageScreen)
        assert expected in app.screen.message and str(p) in app.screen.message
        await pilot.press("enter")
        await pilot.pause()
    assert app.return_code == 2
    assert p.read_bytes() == content


async def test_directory_gets_a_clear_message(tmp_path):
    app = DgEditApp(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, MessageScreen)
        assert "is a directory" in app.screen.message
        await pilot.press("enter")
        await pilot.pause()
    assert app.return_code == 2


async def test_missing_file_offers_to_create_it(tmp_path, engine):
    p = tmp_path / "new.py"
    app = DgEditApp(p, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen) and "does not exist" in app.screen.question
        await pilot.click("#choice-create")
        await pilot.pause()
        assert not p.exists()  # created on save, not before
        await pilot.press("d", "e", "f", "ctrl+s")
        await pilot.pause()
    assert p.read_text() == "def"
    assert stat.S_IMODE(p.stat().st_mode) & 0o600 == 0o600


async def test_missing_file_declined_exits(tmp_path):
    p = tmp_path / "new.py"
    app = DgEditApp(p)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.click("#choice-quit")
        await pilot.pause()
    assert app.return_code == 2 and not p.exists()
