"""What the ghost text looks like: a draft or a diff as a list of styled segments.

Pure functions from the core's events to `Segment`s; the editor paints them. A token the sampler
has accepted is *settled*; one it has not is *tentative* when the model is fairly sure of it and
*faint* when it is not. A finished rewrite is shown as a word diff against the original
(*deleted* text struck through, *inserted* text marked) until the user decides.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Sequence

from dg_edit.events import Step, Token

TENTATIVE_CONFIDENCE = 0.5  # below this an unaccepted token is drawn faint

# Characters a terminal editor must not receive from a model: C0/C1 controls other than tab and
# newline, and the separators `str.splitlines` (hence Textual's Document) would turn into newlines.
_UNSHOWABLE = {c: "\ufffd" for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, 0x85, 0x2028, 0x2029]}


def clean_model_text(text: str) -> str:
    """The model's text as the buffer will hold it: newlines as \\n, unshowable characters as U+FFFD.

    Doing this once, before display, makes what is shown exactly what `tab` inserts.
    """
    return text.replace("\r\n", "\n").replace("\r", "\n").translate(_UNSHOWABLE)


@dataclass(frozen=True)
class Segment:
    text: str
    style: str  # settled, tentative, faint, inserted, deleted


def token_style(token: Token) -> str:
    if token.accepted:
        return "settled"
    return "tentative" if token.confidence >= TENTATIVE_CONFIDENCE else "faint"


def step_segments(step: Step) -> list[Segment]:
    """The draft of one step, each token styled by its state.

    `Step.text` is the whole middle so far; `Step.tokens` cover the current block only (earlier
    blocks are settled). When the tokens do not spell the tail of the text (a multi-byte character
    split across tokens), the draft is shown without per-token detail rather than wrongly.
    """
    text = clean_model_text(step.text)
    pieces = [clean_model_text(t.text) for t in step.tokens]
    joined = "".join(pieces)
    if not step.tokens or not text.endswith(joined):
        return _merge([Segment(text, "tentative")])
    head = text[: len(text) - len(joined)]
    return _merge([Segment(head, "settled")] + [Segment(p, token_style(t)) for p, t in zip(pieces, step.tokens)])


_WORDS = re.compile(r"\w+|\s+|[^\w\s]")


def diff_segments(original: str, final: str) -> list[Segment]:
    """A word-level diff: unchanged text plain ("settled"), removed text "deleted", new text "inserted"."""
    a, b = _WORDS.findall(original), _WORDS.findall(final)
    out: list[Segment] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(Segment("".join(a[i1:i2]), "settled"))
            continue
        if op in ("delete", "replace"):
            out.append(Segment("".join(a[i1:i2]), "deleted"))
        if op in ("insert", "replace"):
            out.append(Segment("".join(b[j1:j2]), "inserted"))
    return _merge(out)


def diff_counts(segments: Sequence[Segment]) -> tuple[int, int]:
    """Characters inserted and deleted, for the status line."""
    ins = sum(len(s.text) for s in segments if s.style == "inserted")
    dele = sum(len(s.text) for s in segments if s.style == "deleted")
    return ins, dele


def _merge(segments: Sequence[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in segments:
        if not s.text:
            continue
        if out and out[-1].style == s.style:
            out[-1] = Segment(out[-1].text + s.text, s.style)
        else:
            out.append(s)
    return out
