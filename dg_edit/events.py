"""Typed events that cross every boundary: engine → websocket frames, LSP progress, TUI animation.

A request yields zero or more `Step`s, then exactly one of `Done`, `Error` (or, in front ends,
a cancellation). `to_json()` gives the wire shape the websocket protocol documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Token:
    """One canvas position of the middle as a person should see it."""

    text: str
    accepted: bool  # the sampler committed this position at this step
    confidence: float  # probability of the shown token under this step's logits

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "accepted": self.accepted, "confidence": round(self.confidence, 4)}


@dataclass(frozen=True)
class Step:
    """The draft after one denoising step. `index` counts up from 1; `total` is the step budget."""

    index: int
    total: int
    text: str  # draft of the middle (argmax canvas, cut at the end of the middle)
    tokens: tuple[Token, ...] = ()
    ids: tuple[int, ...] = ()
    ms: float = 0.0  # elapsed since the request started
    canvas: tuple[int, ...] = ()  # the whole current canvas row the decoder reads next (clamped suffix included)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "step",
            "step": self.index,
            "total": self.total,
            "text": self.text,
            "tokens": [t.to_json() for t in self.tokens],
            "ms": round(self.ms, 1),
        }


@dataclass(frozen=True)
class Done:
    """The final middle; equal to what `Engine.infill` returns for the same input and seed."""

    text: str
    ids: tuple[int, ...]
    steps: int  # decoder forward passes
    tokens_per_forward: float
    ms: float = field(default=0.0, compare=False)  # wall time differs run to run
    length: int = 0  # chosen middle slot length (candidate)
    scores: tuple[float, ...] = field(default=(), compare=False)
    # The rest of the previous answer, which the user has begun to type (no model call; steps 0).
    typed_ahead: bool = False
    encoded: int = field(default=0, compare=False)  # prefix tokens the encoder ran for this request
    prefix_tokens: int = field(default=0, compare=False)  # the windowed prefix the answer is conditioned on
    # Next-edit answers only (`Engine.next_edit`): the suggested edits, character offsets into the request's
    # text (empty: the model keeps the window), the window (start, end) they were chosen in, and whether
    # the answer was prepared in the background while the editor was quiet.
    edits: tuple[Any, ...] = ()  # dg_edit.edits.TextEdit
    window: tuple[int, int] | None = None
    prepared: bool = field(default=False, compare=False)
    # Time the request waited for room in the batch before its first step (`ms` counts from then on).
    waited_ms: float = field(default=0.0, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = {
            "type": "done",
            "text": self.text,
            "steps": self.steps,
            "tokens_per_forward": round(self.tokens_per_forward, 3),
            "ms": round(self.ms, 1),
        }
        if self.steps:  # the model ran it, after waiting for room in its batch (answers without steps never wait)
            out["waited_ms"] = round(self.waited_ms, 1)
        if self.typed_ahead:
            out["typed_ahead"] = True
        if self.window is not None:
            out["edits"] = [e.to_json() for e in self.edits]
            out["window"] = list(self.window)
            if self.prepared:
                out["prepared"] = True
        return out


@dataclass(frozen=True)
class Error:
    """A request failed; `code` is machine-readable (bad_request, busy, model_error, timeout, ...)."""

    code: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": self.message}


Event = Step | Done | Error
