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
from typing import Hashable

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


def document_windows(tokenizer, text: str, window: int, bos_id: int | None, slack: int) -> list[Window]:
    """Every window that some cursor in `text` falls into, with the tokens of the whole document.

    A request's own prefix is cut at its cursor, so its last tokens may differ from these; its token
    count is estimated from the offsets, and `slack` tokens of doubt add the window below.
    """
    n = len(text)
    cap, grid = char_window(window)
    step = token_step(window)
    starts = [0] + list(range(grid, char_start(n, window) + 1, grid))
    out: list[Window] = []
    for cs in starts:
        lo, hi = (0, min(n, cap)) if cs == 0 else (max(cs + cap - grid, cap + 1), min(n, cs + cap - 1))
        if lo > hi:
            continue
        enc = tokenizer(text[cs:hi], add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        ends = [e for _, e in enc["offset_mapping"]]
        lead = [bos_id] if cs == 0 and bos_id is not None else []
        seq = lead + ids
        n_lo = len(lead) + bisect_right(ends, lo - cs)
        first = token_drop(max(n_lo - slack, 1), window)
        last = token_drop(len(seq), window)
        for drop in range(first, last + 1, step):
            top = min(drop + window, len(seq))
            if top <= drop:
                continue
            a = max(drop - len(lead), 0)
            b = max(top - len(lead) - 1, 0)
            span = (cs + (ends[a] if a < len(ends) else hi - cs), cs + (ends[b] if b < len(ends) else hi - cs))
            out.append(Window(key=(0, cs, drop), ids=seq[drop:top], tail=hi == n and drop == last, span=span))
    return out
