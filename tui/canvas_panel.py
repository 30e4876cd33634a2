"""The canvas panel (f3): the whole canvas row as a grid of tokens, redrawn at every denoising step.

This is the picture of how diffusion works for someone who has never seen it: the middle starts
as random tokens (noise), positions settle as the sampler accepts them, the rest is renoised each
step, and the clamped suffix at the end never changes. It shows `Step.canvas` (what the decoder
reads next) and marks positions with `Step.tokens` (accepted or not).
"""

from __future__ import annotations

from typing import Callable, Sequence

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from dg_edit.events import Step

CELL = 7  # characters per token cell


def cell_text(token_text: str) -> str:
    """A token made visible in a fixed-width cell: whitespace and newlines drawn, long tokens cut."""
    shown = token_text.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·") or "∅"
    if len(shown) > CELL - 1:
        shown = shown[: CELL - 2] + "…"
    return shown.ljust(CELL - 1) + " "


def clamped_count(step: Step, suffix_head: Sequence[int]) -> int:
    """How many canvas positions at the end hold the clamped suffix head (0 when this block has none).

    A block that is not the last one of a long middle carries no suffix, so the tail is checked
    against the suffix's own tokens rather than assumed.
    """
    k = len(suffix_head)
    n = len(step.canvas)
    if k and n >= len(step.tokens) + k and tuple(step.canvas[n - k:]) == tuple(suffix_head):
        return k
    return 0


def cell_states(step: Step, clamped: int) -> list[str]:
    """One state per canvas position: settled, noise (renoised this step), slack, clamped."""
    n = len(step.canvas)
    states = []
    for i in range(n):
        if i >= n - clamped:
            states.append("clamped")
        elif i < len(step.tokens):
            states.append("settled" if step.tokens[i].accepted else "noise")
        else:
            states.append("slack")
    return states


class CanvasPanel(Static):
    """Shows the latest `Step`; the app sets `step` (attributes down), the panel redraws itself."""

    COMPONENT_CLASSES = {"canvas--settled", "canvas--noise", "canvas--slack", "canvas--clamped", "canvas--title"}

    step: reactive[Step | None] = reactive(None, always_update=True)

    def __init__(self, decode: Callable[[Sequence[int]], list[str]] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.decode = decode  # ids -> one text per id (None: the canvas ids are not available)
        self.suffix_head: tuple[int, ...] = ()  # the suffix tokens the engine may clamp at the canvas end

    def watch_step(self, step: Step | None) -> None:
        self.update(self.render_step(step))

    def render_step(self, step: Step | None) -> Text:
        title = self.get_component_rich_style("canvas--title")
        if step is None:
            return Text("canvas: no request yet — press ctrl+space (or f2) to infill", style=title)
        accepted = sum(t.accepted for t in step.tokens)
        clamped = clamped_count(step, self.suffix_head)
        where = f"  ·  {len(step.canvas)} positions ({clamped} clamped suffix)" if step.canvas else ""
        out = Text(f"canvas  step {step.index}/{step.total}  ·  {accepted}/{len(step.tokens)} middle tokens "
                   f"accepted{where}\n", style=title)
        if not step.canvas or self.decode is None:  # e.g. --connect: the websocket does not carry the canvas ids
            out.append("(only the middle's tokens: this engine does not report the whole canvas)\n", style=title)
            ids_text = [t.text for t in step.tokens]
            states = ["settled" if t.accepted else "noise" for t in step.tokens]
        else:
            ids_text = self.decode(step.canvas)
            states = cell_states(step, clamped)
        width = max(1, (self.content_size.width or 80) // CELL)
        for i, (text, state) in enumerate(zip(ids_text, states)):
            if i and i % width == 0:
                out.append("\n")
            out.append(cell_text(text), style=self.get_component_rich_style(f"canvas--{state}"))
        return out
