"""The code editor: a `TextArea` that can hold one pending model proposal as ghost text.

While a proposal is pending, the draft lives in the document (so it scrolls, wraps and highlights
like code) but is not the user's text:

- the region it occupies is tracked, styled per token (settled / tentative / faint) or as a diff;
- every draft edit bypasses the undo history (a scratch history is swapped in), so ctrl+z can never
  replay a half-denoised draft;
- the user cannot edit the buffer meanwhile (`edit` refuses anything that is not the proposal's);
- `committed_text()` is the buffer as if the proposal were not there: what saving writes.

`reject()` puts the original text back, leaving `text` equal to what it was before the proposal
byte for byte; `accept()` does the same and then applies the final text as one undoable edit, so
ctrl+z restores the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from rich.text import Text
from textual.document._edit import Edit
from textual.document._history import EditHistory
from textual.widgets import TextArea
from textual.widgets.text_area import Location, Selection

from .ghost import Segment

STYLES = ("settled", "tentative", "faint", "inserted", "deleted")


@dataclass
class Proposal:
    """A pending change: `original` was at `start`..`original_end`; the draft now spans `start`..`end`."""

    kind: str  # "infill" or "rewrite"
    start: Location
    original_end: Location
    original: str
    selection_before: Selection
    end: Location
    final: str | None = None  # set when the model is done; None while it still denoises


class EditorArea(TextArea):
    """`TextArea.code_editor` plus the pending-proposal region (see the module docstring)."""

    COMPONENT_CLASSES = TextArea.COMPONENT_CLASSES | {f"proposal--{name}" for name in STYLES}
    _defer_highlights = False  # class default: TextArea.__init__ builds highlights before ours runs

    def __init__(self, text: str = "", *, language: str | None = None, **kwargs):
        super().__init__(text, language=language, theme="monokai", soft_wrap=False, tab_behavior="indent",
                         show_line_numbers=True, **kwargs)
        self.proposal: Proposal | None = None
        self.tab_yields = False  # set by the app while a next-edit suggestion is shown: tab applies it
        self._proposal_editing = False
        self._spans: dict[int, list[tuple[int, int | None, str]]] = {}  # line -> (col0, col1|None, style)

    # ------------------------------------------------------------------ the user's text
    def committed_text(self) -> str:
        """The buffer without the pending proposal: what the user has actually written."""
        p = self.proposal
        if p is None:
            return self.text
        doc = self.document
        return doc.get_text_range(doc.start, p.start) + p.original + doc.get_text_range(p.end, doc.end)

    def edit(self, edit: Edit):
        """All document changes pass here; while a proposal is pending only its own edits may."""
        if self.proposal is not None and not self._proposal_editing:
            self.app.bell()
            return None
        return super().edit(edit)

    def check_consume_key(self, key: str, character: str | None = None) -> bool:
        """Tab indents, except while the app shows a suggestion that tab applies (the app's binding)."""
        if key == "tab" and self.tab_yields:
            return False
        return super().check_consume_key(key, character)

    def undo(self) -> None:
        if self.proposal is None:
            super().undo()

    def redo(self) -> None:
        if self.proposal is None:
            super().redo()

    # ------------------------------------------------------------------ proposal lifecycle
    def begin_proposal(self, kind: str, start: Location, end: Location) -> Proposal:
        """Mark `start`..`end` (empty for an infill) as the region a proposal will replace."""
        if self.proposal is not None:
            raise RuntimeError("a proposal is already pending")
        start, end = sorted((start, end))
        self.proposal = Proposal(kind=kind, start=start, original_end=end, original=self.get_text_range(start, end),
                                 selection_before=self.selection, end=end)
        self.read_only = True
        self.highlight_cursor_line = False  # its background would paint over the proposal's
        return self.proposal

    def show_segments(self, segments: Sequence[Segment]) -> None:
        """Show the draft: replace the proposal region with `segments`, each styled by its kind."""
        p = self.proposal
        if p is None:
            return
        text = "".join(s.text for s in segments)
        p.end = self._replace_unrecorded(text, p.start, p.end, draft=True)
        self._spans = _spans_by_line(p.start, segments)
        self.notify_style_update()
        self.refresh()

    def reject(self) -> Proposal | None:
        """Drop the proposal; the buffer is exactly what it was before `begin_proposal`."""
        p = self._end_proposal()
        if p is not None:
            self.selection = p.selection_before
        return p

    def accept(self) -> Proposal | None:
        """Apply the proposal's final text as one undoable edit (ctrl+z brings the original back)."""
        p = self.proposal
        if p is None or p.final is None:
            return None
        self._end_proposal()
        self.history.checkpoint()
        self.selection = p.selection_before
        if p.final != p.original:
            self.replace(p.final, p.start, p.original_end, maintain_selection_offset=False)
        self.history.checkpoint()
        return p

    def _end_proposal(self) -> Proposal | None:
        p = self.proposal
        if p is None:
            return None
        self._replace_unrecorded(p.original, p.start, p.end)
        self.proposal = None
        self._spans = {}
        self.read_only = False
        self.highlight_cursor_line = True
        self.notify_style_update()
        self.refresh()
        return p

    def _replace_unrecorded(self, text: str, start: Location, end: Location, *, draft: bool = False) -> Location:
        """A document edit that leaves no trace in the undo history (drafts are not the user's edits).

        For a `draft`, the syntax highlights are shifted rather than recomputed: TextArea re-queries the
        whole syntax tree after every edit, which on a file of a few thousand lines costs more than a
        denoising step. The proposal region itself is painted by the ghost styles; the real highlights
        come back with the edit that ends the proposal.
        """
        real_history = self.history
        self.history = EditHistory(max_checkpoints=1, checkpoint_timer=0.0, checkpoint_max_characters=1)
        self._proposal_editing = True
        self._defer_highlights = draft
        try:
            new_end = super().edit(Edit(text, start, end, maintain_selection_offset=False)).end_location
        finally:
            self.history = real_history
            self._proposal_editing = False
            self._defer_highlights = False
        if draft:
            self._shift_highlights(start, end, new_end)
        return new_end

    def _build_highlight_map(self) -> None:
        if not self._defer_highlights:
            super()._build_highlight_map()

    def _shift_highlights(self, start: Location, old_end: Location, new_end: Location) -> None:
        """Move the highlights below an edit by its change in line count; drop those inside it."""
        highlights = self._highlights  # row -> [(start_byte, end_byte | None, name)], TextArea's own map
        delta = new_end[0] - old_end[0]
        shifted: dict[int, list] = {}
        for row, items in highlights.items():
            if row < start[0]:
                shifted[row] = items
            elif row > old_end[0]:
                shifted[row + delta] = items
            elif row == start[0]:  # keep what ends before the edit on its first line
                cut = len(self.document.get_line(row)[: start[1]].encode("utf-8"))
                kept = [h for h in items if h[1] is not None and h[1] <= cut]
                if kept:
                    shifted[row] = kept
        highlights.clear()
        highlights.update(shifted)
        self.notify_style_update()

    # ------------------------------------------------------------------ rendering
    def get_line(self, line_index: int) -> Text:
        """TextArea's documented hook for extra styling: paint the proposal region of this line."""
        line = super().get_line(line_index)
        for col0, col1, style in self._spans.get(line_index, ()):
            line.stylize(self.get_component_rich_style(f"proposal--{style}"), col0,
                         len(line.plain) if col1 is None else col1)
        return line


def _spans_by_line(start: Location, segments: Iterable[Segment]) -> dict[int, list[tuple[int, int | None, str]]]:
    """Turn consecutive styled segments starting at `start` into per-line column ranges."""
    spans: dict[int, list[tuple[int, int | None, str]]] = {}
    row, col = start
    for seg in segments:
        parts = seg.text.splitlines(keepends=True) or [""]
        for part in parts:
            body = part.rstrip("\r\n")
            if body or part != body:
                spans.setdefault(row, []).append((col, col + len(body) if part == body else None, seg.style))
            if part != body:  # the part ended a line
                row, col = row + 1, 0
            else:
                col += len(body)
    return spans
