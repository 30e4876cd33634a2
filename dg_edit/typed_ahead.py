"""Typed-ahead: when the user types the beginning of the answer they were shown, the rest of that
answer is still the answer. llama.vim does the same ("cache hit with the typed characters removed").

The engine keeps the last answer per (session, seed) and, before running the model, asks
`rest_after_typing`: if the new request is the old one with part of the answer typed at the cursor
(same suffix, same options, the prefix grown by a proper beginning of the answer), the rest comes
back at once as a `Done` with `typed_ahead=True` and `steps=0`. Every front end (language server,
websocket service, TUI) gets it through `Engine.stream`/`infill` without code of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable


@dataclass(frozen=True)
class Answer:
    """One answer as the user saw it: where it was asked, with which options, and its text."""

    prefix: str
    suffix: str
    text: str
    options: Hashable  # everything besides the text that shapes an answer (seed, budgets, sampling)


def rest_after_typing(previous: Answer | None, prefix: str, suffix: str, options: Hashable) -> str | None:
    """The rest of `previous.text` if `prefix` is `previous.prefix` plus a proper beginning of it.

    None when the request is anything else (another place, another suffix or options, text that
    departs from the answer, nothing typed yet, or only whitespace left to show).
    """
    if previous is None or previous.options != options or previous.suffix != suffix:
        return None
    if len(prefix) <= len(previous.prefix) or not prefix.startswith(previous.prefix):
        return None
    typed = prefix[len(previous.prefix):]
    if len(typed) >= len(previous.text) or not previous.text.startswith(typed):
        return None
    rest = previous.text[len(typed):]
    return rest if rest.strip() else None
