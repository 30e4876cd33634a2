"""Prefix windows: which tokens, at which positions, the encoder sees for a cursor in a document.

A request conditions on at most `window` prefix tokens (`Settings.max_prefix_tokens`, within the
model's positions). Beyond that the prefix is cut on the left, in coarse steps, so that the cut
moves rarely and each cut serves many cursors from one cached strip of encoder states
(`dg_edit.prefix_cache`). Two cuts, both functions of the prefix text alone (a warm request and a
cold one see the same tokens at the same positions):

1. Characters (`char_start`): a prefix longer than 16 characters per window token is tokenized from
   a start snapped to a grid of a quarter of that, so tokenizer work stays bounded on huge files.
   Only a prefix read from the document's start begins with BOS.
2. Tokens (`token_drop`): more than `window` tokens are cut on the left in steps of half a window,
   so a prefix keeps between half a window and a window of tokens. Each cut (a *window* of the
   document) serves half a window of cursors; the cached strips of a whole document hold about
   twice its tokens.

`document_windows` lists the windows every cursor of a document uses, for idle prefill.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import Hashable, Iterator

CHARS_PER_TOKEN_CAP = 16  # a window of tokens never needs more characters than this (whitespace runs)


def char_window(window: int) -> tuple[int, int]:
    """(cap, grid): the most characters tokenized for one prefix, and the grid its start snaps to."""
    cap = window * CHARS_PER_TOKEN_CAP
    return cap, max(cap // 4, 1)


def char_start(n_chars: int, window: int) -> int:
    """Where a prefix of `n_chars` characters starts being tokenized (0, or a multiple of the grid)."""
    cap, grid = char_window(window)
    if n_chars <= cap:
        return 0
    return ((n_chars - cap) // grid + 1) * grid


def token_step(window: int) -> int:
    return max(window // 2, 1)


def token_drop(n_tokens: int, window: int) -> int:
    """Tokens cut on the left of an `n_tokens` prefix: 0, or a multiple of half a window."""
    if n_tokens <= window:
        return 0
    step = token_step(window)
    return math.ceil((n_tokens - window) / step) * step


@dataclass(frozen=True)
class Window:
    """One window of a document: the tokens a request there starts with, and where its cursors are."""

    key: Hashable  # the same key a request in this window computes (`Engine._prefix_window`)
    ids: list[int]  # the longest prefix any cursor in this window has
    tail: bool  # ends where the document ends (a cursor at the very end sees exactly `ids`)
    span: tuple[int, int]  # character range of the document its tokens cover


def document_windows(tokenizer, text: str, window: int, bos_id: int | None, slack: int,
                     near: int | None = None) -> Iterator[Window]:
    """Every window that some cursor in `text` falls into, with the tokens of the whole document.

    A request's own prefix is cut at its cursor, so its last tokens may differ from these; its token
    count is estimated from the offsets, and `slack` tokens of doubt add the window below. With
    `near` (a character offset: the last cursor) the windows come nearest first, and the document is
    tokenized one character window at a time as they are needed (a 10 MB file is never tokenized
    whole when the cache budget holds only the part around the cursor).
    """
    n = len(text)
    cap, grid = char_window(window)
    segments = []
    for cs in [0] + list(range(grid, char_start(n, window) + 1, grid)):
        lo, hi = (0, min(n, cap)) if cs == 0 else (max(cs + cap - grid, cap + 1), min(n, cs + cap - 1))
        if lo <= hi:
            segments.append((cs, lo, hi))
    if near is not None:
        segments.sort(key=lambda seg: _distance((seg[1], seg[2]), near))
    for cs, lo, hi in segments:
        windows = _segment_windows(tokenizer, text, window, bos_id, slack, cs, lo, hi)
        if near is not None:
            windows.sort(key=lambda w: _distance(w.span, near))
        yield from windows


def _segment_windows(tokenizer, text: str, window: int, bos_id: int | None, slack: int, cs: int, lo: int,
                     hi: int) -> list[Window]:
    """The windows of the cursors lo..hi, whose prefixes are all tokenized from character `cs`."""
    step = token_step(window)
    enc = tokenizer(text[cs:hi], add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    ends = [e for _, e in enc["offset_mapping"]]
    lead = [bos_id] if cs == 0 and bos_id is not None else []
    seq = lead + ids
    n_lo = len(lead) + bisect_right(ends, lo - cs)
    first = token_drop(max(n_lo - slack, 1), window)
    last = token_drop(len(seq), window)
    out = []
    for drop in range(first, last + 1, step):
        top = min(drop + window, len(seq))
        if top <= drop:
            continue
        a, b = max(drop - len(lead), 0), max(top - len(lead) - 1, 0)
        span = (cs + (ends[a] if a < len(ends) else hi - cs), cs + (ends[b] if b < len(ends) else hi - cs))
        out.append(Window(key=(0, cs, drop), ids=seq[drop:top], tail=hi == len(text) and drop == last, span=span))
    return out


def _distance(span: tuple[int, int], cursor: int) -> int:
    lo, hi = span
    return 0 if lo <= cursor <= hi else min(abs(cursor - lo), abs(cursor - hi))
