"""Helpers for driving the TUI with Textual's pilot, shared by the TUI test files."""

from __future__ import annotations

from dg_edit.tui.app import DgEditApp

SOURCE = 'import os\n\n\ndef add(a, b):\n    return a + b\n\n\ndef main():\n    \n'  # main's body is the hole to infill
SIZE = (110, 32)


async def wait_for(pilot, condition, timeout: float = 60.0, what: str = "condition") -> None:
    """Let the app run until `condition()` holds (model work happens in a thread)."""
    loop_time = 0.0
    while not condition():
        if loop_time > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)
        loop_time += 0.05


async def infill_at(pilot, app: DgEditApp, location, key: str = "ctrl+space") -> None:
    """Infill at `location` until the model proposes some text (sampling is random: an empty middle
    is a legitimate answer, so ask again a few times)."""
    for _ in range(6):
        app.editor.move_cursor(location)
        await pilot.press(key)
        await wait_for(pilot, lambda: app.editor.proposal is not None and app.editor.proposal.final is not None
                       or app.editor.proposal is None and app.request is None, what="the model to finish")
        if app.editor.proposal is not None:
            assert app.editor.proposal.final
            return
        assert "proposed nothing" in app.status.message and app.editor.text == app.editor.committed_text()
    raise AssertionError("the model proposed nothing six times in a row")


def proposal_styles(editor) -> list[str]:
    """The proposal styles painted on the lines of the pending proposal, as the renderer sees them."""
    p = editor.proposal
    names = {f"proposal--{n}": n for n in ("settled", "tentative", "faint", "inserted", "deleted")}
    styles = {editor.get_component_rich_style(c): n for c, n in names.items()}
    found = []
    for row in range(p.start[0], p.end[0] + 1):
        for span in editor.get_line(row).spans:
            if span.style in styles:
                found.append(styles[span.style])
    return found


def split(text: str, row: int, col: int) -> tuple[str, str]:
    lines = text.split("\n")
    offset = sum(len(line) + 1 for line in lines[:row]) + col
    return text[:offset], text[offset:]
