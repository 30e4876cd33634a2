"""The status line: file, unsaved marker, what the model is doing, and the last message.

The app sets these reactives (attributes down); the widget only draws them.
"""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static


class StatusLine(Static):
    COMPONENT_CLASSES = {"status--file", "status--dirty", "status--phase", "status--progress", "status--error"}

    file_label: reactive[str] = reactive("")
    dirty: reactive[bool] = reactive(False)
    phase: reactive[str] = reactive("")
    progress: reactive[str] = reactive("")  # "step 3/8 · 1.50 tok/fwd · 120 ms"
    message: reactive[str] = reactive("")
    error: reactive[bool] = reactive(False)  # the message reports a problem

    def render(self) -> Text:
        style = self.get_component_rich_style
        out = Text(no_wrap=True, overflow="ellipsis")
        out.append(self.file_label, style=style("status--file"))  # the name only: keep the line for the model
        if self.dirty:
            out.append(" [+]", style=style("status--dirty"))
        if self.phase:
            out.append(f"  {self.phase}", style=style("status--phase"))
        if self.progress:
            out.append(f"  {self.progress}", style=style("status--progress"))
        if self.message:
            out.append(f"  {self.message}", style=style("status--error") if self.error else "")
        return out
