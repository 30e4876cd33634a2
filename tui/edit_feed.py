"""The user's edits as `TextEdit`s, for the engine's edit history, from the TextArea's whole text.

Textual's `TextArea.Changed` says only that the text changed. Diffing the whole file on every
keystroke would cost more than the keystroke on a large file, so the part both texts share at their
ends is cut off first (at C speed, by comparing halves), widened to whole words so that a rename
reads as one edit of the name. A small middle (one keystroke, a word typed over a selection) is one
edit of whole words, so that keystroke after keystroke join into one history edit ("count" became
"total", not "coun" deleted and "otal" typed); a large one (a paste, a reload) goes through
`dg_edit.edits.diff_edits` for its minimal edits.
"""

from __future__ import annotations

from dg_edit.edits import TextEdit, diff_edits

WHOLE_WORDS_MAX = 200  # characters: a changed middle up to this long is recorded as one edit


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # the longest n with a[:n] == b[:n], by bisection over slice comparisons
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _word(c: str) -> bool:
    return c.isalnum() or c == "_"


def changed_edits(old: str, new: str) -> list[TextEdit]:
    """The edits that turn `old` into `new`, in the order to record them: each one's offsets index
    the text just before it (the last edit in the text first, so earlier offsets stay valid)."""
    if old == new:
        return []
    head = _common_prefix(old, new)
    tail = _common_suffix(old, new, min(len(old), len(new)) - head)
    while head > 0 and _word(old[head - 1]):  # back to the start of the word the change is in
        head -= 1
    while tail > 0 and _word(old[len(old) - tail]):  # and on to the end of it
        tail -= 1
    old_mid, new_mid = old[head: len(old) - tail], new[head: len(new) - tail]
    if max(len(old_mid), len(new_mid)) <= WHOLE_WORDS_MAX:
        return [TextEdit(head, head + len(old_mid), new_mid, old_mid)]
    edits = diff_edits(old_mid, new_mid, offset=head)
    return sorted(edits, key=lambda e: e.start, reverse=True)
