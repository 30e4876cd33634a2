"""Next-edit suggestions in the TUI, driven like a person drives it (Textual's pilot, the real
in-process engine): the user's edits reach the engine's edit history, the suggestion is shown as a
diff under the editor, tab applies it as one undo step, escape dismisses it, typing or a stale
answer never leaves it on screen, and a failing model is reported with the buffer untouched."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from textual.widgets.text_area import Selection

from dg_edit import Done
from dg_edit.edits import TextEdit
from dg_edit.tui.app import DgEditApp
from tui_pilot import SIZE, wait_for

pytestmark = pytest.mark.timeout(180)

RENAME = "def total_price(items):\n    count = 0\n    for item in items:\n        count += item.price\n    return count\n"
RENAMED = RENAME.replace("    count = 0", "    total = 0", 1)


@pytest.fixture
def rename_file(tmp_path) -> Path:
    p = tmp_path / "prices.py"
    p.write_text(RENAME, encoding="utf-8")
    return p


async def rename(pilot, app: DgEditApp) -> None:
    """Select `count` on line 2 and type `total` over it, key by key."""
    app.editor.selection = Selection((1, 4), (1, 9))
    await pilot.press(*"total")
    await wait_for(pilot, lambda: app.editor.text == RENAMED, what="the rename")


async def suggestion_after(pilot, app: DgEditApp, key: str | None) -> object:
    """Press `key` (None: wait for the quiet timer) and wait for the suggestion; fail with the reason."""
    if key is not None:
        await pilot.press(key)
    await wait_for(pilot, lambda: app.suggestion is not None or "suggests nothing" in app.status.message
                   or app.status.error, timeout=120, what="the next-edit answer")
    assert app.suggestion is not None, f"no suggestion: {app.status.message}"
    return app.suggestion


async def test_rename_is_history_the_suggestion_is_a_diff_and_tab_applies_it(rename_file, engine):
    app = DgEditApp(rename_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await rename(pilot, app)
        # The keystrokes reached the engine's history as one edit of the name, in characters.
        start = RENAME.index("count")
        assert engine.recent_edits(app._session)[-1] == TextEdit(start, start + 5, "total", "count"), engine.recent_edits(app._session)
        suggestion = await suggestion_after(pilot, app, "f4")
        edit = suggestion.edit
        assert suggestion.text == RENAMED and edit.text != edit.old_text
        assert RENAMED[edit.start: edit.end] == edit.old_text
        # Shown as a diff under the editor; the buffer is untouched.
        panel = app.next_edit_panel
        assert panel.display is True
        shown = panel.render_diff(suggestion).plain
        before, old, new, after = suggestion.lines()
        assert f"line {suggestion.line}" in shown
        assert f"- {before}{old}{after}" in shown and f"+ {before}{new}{after}".split("\n")[0] in shown
        assert app.editor.text == RENAMED
        # tab applies exactly the edit; ctrl+z takes it back in one step.
        await pilot.press("tab")
        await pilot.pause()
        applied = RENAMED[: edit.start] + edit.text + RENAMED[edit.end:]
        assert app.editor.text == applied
        assert app.suggestion is None and panel.display is False
        await pilot.press("ctrl+z")
        await pilot.pause()
        assert app.editor.text == RENAMED


async def test_a_pause_after_an_edit_brings_a_suggestion_and_escape_dismisses_it(rename_file, engine):
    app = DgEditApp(rename_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await rename(pilot, app)
        await suggestion_after(pilot, app, None)  # no key: the quiet timer asked
        await pilot.press("escape")
        await pilot.pause()
        assert app.suggestion is None and app.next_edit_panel.display is False
        assert app.editor.text == RENAMED
        # Without a suggestion (or proposal) tab keeps its meaning: it indents.
        app.editor.move_cursor((4, 0))
        await pilot.press("tab")
        await pilot.pause()
        assert app.editor.text.split("\n")[4].startswith(" " * 8 + "return")


async def test_typing_clears_the_suggestion(rename_file, engine):
    app = DgEditApp(rename_file, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await rename(pilot, app)
        await suggestion_after(pilot, app, "f4")
        app.editor.move_cursor((4, len("    return count")))
        await pilot.press("x")
        await pilot.pause()
        assert app.suggestion is None and app.next_edit_panel.display is False
        assert app.editor.text == RENAMED.replace("return count", "return countx")


class HeldNextEdit:
    """The real engine, but each next-edit answer waits until the test releases it."""

    def __init__(self, engine, fail: bool = False):
        self.engine, self.fail = engine, fail
        self.tokenizer, self.settings = engine.tokenizer, engine.settings
        self.release = threading.Event()
        self.asked = threading.Event()

    def record_edit(self, session, edit):
        self.engine.record_edit(session, edit)

    def stream(self, *args, **kwargs):
        return self.engine.stream(*args, **kwargs)

    def stream_next_edit(self, *args, **kwargs):
        self.asked.set()
        if not self.release.wait(60):
            raise TimeoutError("the test never released the answer")
        if self.fail:
            raise RuntimeError("simulated model failure")
        return self.engine.stream_next_edit(*args, **kwargs)


async def test_an_answer_for_text_that_changed_is_never_shown(rename_file, engine):
    held = HeldNextEdit(engine)
    app = DgEditApp(rename_file, engine=held)
    async with app.run_test(size=SIZE) as pilot:
        await rename(pilot, app)
        await pilot.press("f4")
        await wait_for(pilot, held.asked.is_set, what="the request")
        app.editor.move_cursor((0, 0))
        await pilot.press("#")  # the text moves on while the model works
        held.release.set()
        await wait_for(pilot, lambda: not app.workers, timeout=120, what="the model to finish")
        await pilot.pause(0.2)
        assert app.suggestion is None
        assert app.editor.text == "#" + RENAMED


async def test_a_failing_model_is_reported_and_the_buffer_kept(rename_file, engine):
    held = HeldNextEdit(engine, fail=True)
    held.release.set()
    app = DgEditApp(rename_file, engine=held)
    async with app.run_test(size=SIZE) as pilot:
        await rename(pilot, app)
        await pilot.press("f4")
        await wait_for(pilot, lambda: app.status.error, what="the error")
        assert "next edit failed" in app.status.message and "simulated model failure" in app.status.message
        assert app.suggestion is None and app.editor.text == RENAMED


def test_done_frames_carry_the_edits_over_the_websocket():
    from dg_edit.tui.remote import done_from_frame

    done = Done(text="x", ids=(), steps=2, tokens_per_forward=1.0, ms=3.0,
                edits=(TextEdit(4, 9, "total", "count", 0.5),), window=(0, 20), prepared=True)
    again = done_from_frame(done.to_json())
    assert again.edits == done.edits and again.window == done.window and again.prepared is True
