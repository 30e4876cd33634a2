"""The next-edit panel: the edit the model suggests the user makes next, as a diff.

Shown under the editor while a suggestion is pending (tab applies it, escape dismisses it): which
line it starts on, the lines it removes (`-`) and the lines it writes (`+`), each whole line with
the changed part marked. The app sets `suggestion` (attributes down); the panel redraws itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from dg_edit.edits import TextEdit


@dataclass(frozen=True)
class Suggestion:
    """A suggested `edit` for the buffer's text `text` (its offsets index that text)."""

    edit: TextEdit
    text: str

    @property
    def line(self) -> int:
        """1-based line where the edit starts."""
        return self.text.count("\n", 0, self.edit.start) + 1

    def lines(self) -> tuple[str, str, str, str]:
        """(before, old, new, after): the edit's whole lines split at its ends, for a line diff."""
        e, text = self.edit, self.text
        line_start = text.rfind("\n", 0, e.start) + 1
        line_end = text.find("\n", e.end)
        line_end = len(text) if line_end < 0 else line_end
        return text[line_start: e.start], text[e.start: e.end], e.text, text[e.end: line_end]


class NextEditPanel(Static):
    COMPONENT_CLASSES = {"next-edit--title", "next-edit--removed", "next-edit--added", "next-edit--changed"}

    suggestion: reactive[Suggestion | None] = reactive(None)

    def watch_suggestion(self, suggestion: Suggestion | None) -> None:
        self.display = suggestion is not None
        self.update(self.render_diff(suggestion) if suggestion is not None else "")
        self.app.refresh_bindings()  # tab and escape act only while a suggestion (or proposal) is shown

    def render_diff(self, suggestion: Suggestion) -> Text:
        before, old, new, after = suggestion.lines()
        title = self.get_component_rich_style("next-edit--title")
        removed = self.get_component_rich_style("next-edit--removed")
        added = self.get_component_rich_style("next-edit--added")
        changed = self.get_component_rich_style("next-edit--changed")
        out = Text()
        out.append(f"next edit at line {suggestion.line} · tab applies · escape dismisses\n", style=title)
        for sign, middle, style in (("-", old, removed), ("+", new, added)):
            body = Text(f"{sign} ", style=style)
            body.append(before, style=style)
            body.append(middle, style=style + changed)
            body.append(after, style=style)
            rows = body.split("\n")  # a multi-line edit: every line gets the sign's colour
            for i, row in enumerate(rows):
                if i:
                    out.append(Text(f"{sign} ", style=style))
                out.append(row)
                out.append("\n")
        out.rstrip()
        return out
