"""Text edits: what a user just did to a document, and what next-edit prediction suggests they do next.

Every front end sees edits differently: the language server gets `didChange` deltas (a range and its
new text), the websocket page and the TUI know the whole text before and after. `TextEdit` is the one
shape they all hand the engine (`Engine.record_edit`), and the one shape a next-edit answer comes back
in (`Done.edits`). Offsets are *character* offsets (Python `str` indices) so that no front end has to
agree with another on UTF-16 or bytes: each converts at its own boundary.

`EditHistory` keeps a document's last edits, bounded in count and characters, and joins keystrokes
into one edit while they touch the text the previous edit wrote (typing a word is one edit, not five),
so that the history a model reads says "renamed `count` to `total`", not "typed l".

`diff_edits` turns two texts into the minimal edits between them, for front ends that only know full
texts and for reading a rewritten window back as edits.

No torch, no tokenizer: front ends import this module alone.
"""

from __future__ import annotations

import difflib
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

_PIECE = re.compile(r"\w+|\s+|[^\w\s]")  # words, runs of whitespace, single punctuation marks


@dataclass(frozen=True)
class TextEdit:
    """Replace `text[start:end]` (which read `old_text`) with `text`.

    For a recorded edit the offsets index the document *before* the edit; for a suggestion they index
    the text the request was made with. `score` is the model's confidence in a suggested edit (0..1).
    """

    start: int
    end: int
    text: str
    old_text: str = ""
    score: float = 0.0

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"edit {name} must be a character offset (an integer >= 0), got {v!r}")
        if self.end < self.start:
            raise ValueError(f"edit end ({self.end}) is before its start ({self.start})")
        for name in ("text", "old_text"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"edit {name} must be text (str), got {type(value).__name__}")
            try:  # a lone surrogate would poison every prompt the history goes into
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"edit {name} is not valid UTF-8 text ({e.reason} at position {e.start})") from None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"start": self.start, "end": self.end, "text": self.text}
        if self.old_text:
            out["old_text"] = self.old_text
        out["score"] = round(float(self.score), 4)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TextEdit":
        """An edit from its wire shape; raises `ValueError` with the field at fault."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an edit must be an object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"start", "end", "text", "old_text", "score"})
        if unknown:
            raise ValueError(f"unknown edit key(s): {', '.join(unknown)}; accepted: start, end, text, old_text, score")
        for key in ("start", "end", "text"):
            if key not in data:
                raise ValueError(f"an edit needs {key!r}")
        score = data.get("score", 0.0)
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise ValueError(f"edit score must be a number, got {score!r}")
        return cls(start=data["start"], end=data["end"], text=data["text"], old_text=data.get("old_text", ""),
                   score=float(score))

    def apply(self, document: str) -> str:
        """`document` with this edit made (offsets index `document`)."""
        if self.end > len(document):
            raise ValueError(f"edit end {self.end} is past the end of the text ({len(document)} characters)")
        return document[: self.start] + self.text + document[self.end:]


def apply_edits(document: str, edits: Iterable[TextEdit]) -> str:
    """Make non-overlapping `edits` (all indexing `document`) at once."""
    out = document
    for edit in sorted(edits, key=lambda e: e.start, reverse=True):
        out = edit.apply(out)
    return out


def merge(prev: TextEdit, new: TextEdit) -> TextEdit | None:
    """One edit doing `prev` then `new`, when `new` touches the text `prev` wrote; else None.

    `new` indexes the text after `prev`; the result indexes the text before `prev`, like `prev`.
    """
    ps, n_written = prev.start, len(prev.text)
    a, b = new.start, new.end
    if a > ps + n_written or b < ps:
        return None
    lo = min(a, ps)  # same offset before and after `prev`: it is at or before prev's start
    hi_after = max(b, ps + n_written)  # in the text after `prev`
    hi_before = hi_after - n_written + (prev.end - ps)
    # What [lo, hi) read before `prev`, and reads after `new`, pieced from the two edits.
    left_old = new.old_text[: ps - a] if a < ps else ""
    right_old = new.old_text[ps + n_written - a:] if b > ps + n_written else ""
    left_new = prev.text[: a - ps] if a > ps else ""
    right_new = prev.text[b - ps:] if b < ps + n_written else ""
    return TextEdit(lo, hi_before, left_new + new.text + right_new, left_old + prev.old_text + right_old,
                    score=new.score)


class EditHistory:
    """A document's last edits, oldest first, within `max_edits` edits and `max_chars` characters.

    `record` joins an edit into the previous one when it touches what the previous one wrote (see
    `merge`), and drops an edit that changes nothing.
    """

    def __init__(self, max_edits: int = 8, max_chars: int = 2000):
        if max_edits <= 0 or max_chars <= 0:
            raise ValueError("an edit history needs room for at least one edit and one character")
        self.max_edits = max_edits
        self.max_chars = max_chars
        self._edits: deque[TextEdit] = deque()
        self.version = 0  # counts up on every change: what a prepared suggestion was made from

    def record(self, edit: TextEdit) -> None:
        if not isinstance(edit, TextEdit):
            raise ValueError(f"record takes a TextEdit, got {type(edit).__name__}")
        if edit.text == edit.old_text and edit.end - edit.start == len(edit.old_text):
            return
        self.version += 1
        if self._edits:
            joined = merge(self._edits[-1], edit)
            if joined is not None:
                self._edits.pop()
                if joined.text != joined.old_text:  # typing a word, then deleting it: nothing left
                    self._edits.append(joined)
                self._trim()
                return
        self._edits.append(edit)
        self._trim()

    def _trim(self) -> None:
        while len(self._edits) > self.max_edits:
            self._edits.popleft()
        while self._edits and sum(len(e.text) + len(e.old_text) for e in self._edits) > self.max_chars:
            if len(self._edits) == 1:  # one huge edit: keep its ends, which say what changed
                e = self._edits[0]
                half = max(self.max_chars // 4, 1)
                self._edits[0] = TextEdit(e.start, e.end, _clip(e.text, half), _clip(e.old_text, half), e.score)
                break
            self._edits.popleft()

    def recent(self) -> tuple[TextEdit, ...]:
        return tuple(self._edits)

    def clear(self) -> None:
        self._edits.clear()
        self.version += 1

    def __len__(self) -> int:
        return len(self._edits)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= 2 * n else text[:n] + text[-n:]


def diff_edits(old: str, new: str, offset: int = 0) -> list[TextEdit]:
    """The minimal edits that turn `old` into `new`, as offsets into `old` plus `offset`.

    Compared word by word (words, whitespace runs, punctuation marks), so a rename is one edit of the
    name and not of the letters that differ; edits separated by nothing are one edit.
    """
    if old == new:
        return []
    a, b = _PIECE.findall(old), _PIECE.findall(new)
    a_at = _offsets(a)
    b_at = _offsets(b)
    out: list[TextEdit] = []
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        start, end = a_at[i1], a_at[i2]
        text = new[b_at[j1]: b_at[j2]]
        old_text = old[start:end]
        # Trim what the two sides share at their ends (a word changed in its middle keeps its ends).
        k = 0
        while k < min(len(text), len(old_text)) and text[k] == old_text[k]:
            k += 1
        m = 0
        while m < min(len(text), len(old_text)) - k and text[-1 - m] == old_text[-1 - m]:
            m += 1
        if k or m:
            start, end = start + k, end - m
            text, old_text = text[k: len(text) - m], old_text[k: len(old_text) - m]
        out.append(TextEdit(start + offset, end + offset, text, old_text))
    return out


def _offsets(pieces: list[str]) -> list[int]:
    at = [0]
    for p in pieces:
        at.append(at[-1] + len(p))
    return at
