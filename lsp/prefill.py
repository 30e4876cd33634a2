"""Idle prefill of open documents: a completion anywhere in an open file starts warm.

On didOpen and didChange (`documents.on_open_or_change`) the document's text goes to the engine
(`Engine.prefill`), which encodes its missing windows in the background once the editor has been
quiet for `idle_prefill_ms`, at low priority, pausing for every request. When the engine is not
loaded yet, or is replaced after a settings change, every open document is handed over once it is
ready. Only documents in an enabled language are prefilled; closing one drops its caches
(`documents.on_close` → `Engine.forget`).

No handler of its own: didOpen/didChange belong to `documents` (open and change share one
handler), settings to `config`; both call `schedule`/`schedule_all`.

`dgEdit/stats` shows the result under `cache` (bytes per token, budget, documents, prefill state),
and each completion record says how many prefix tokens its request encoded (`encoded`).
"""

from __future__ import annotations

import asyncio
import logging

from . import documents
from .context import other_documents
from .engine_host import EngineUnavailable
from .state import DgEditServer

logger = logging.getLogger(__name__)


def schedule(ls: DgEditServer, uri: str) -> None:
    """Hand `uri`'s current text to the engine for idle prefill (never blocks the event loop)."""
    doc = ls.workspace.text_documents.get(uri)
    if doc is None or not documents.language_enabled(ls, doc):
        return
    engine = ls.host.loaded()
    if engine is None:
        schedule_all(ls)  # once the engine is ready
        return
    # behind the same chunks of the other open documents that its requests carry (`context`)
    engine.prefill(uri, doc.source, extra=other_documents(ls, uri))


def schedule_all(ls: DgEditServer) -> None:
    """Prefill every open document: now, or once the engine is ready (loading, or re-wrapped with new
    settings). Opening or closing a document changes the others' context chunks, hence their windows."""
    if ls.host.loaded() is not None:
        for uri in list(ls.workspace.text_documents):
            schedule(ls, uri)
        return
    if ls.prefill_waiting is not None and not ls.prefill_waiting.done():
        return
    ls.prefill_waiting = asyncio.ensure_future(_when_ready(ls))


async def _when_ready(ls: DgEditServer) -> None:
    try:
        engine = await ls.host.get()
        while ls.host.loaded() is not engine:  # replaced meanwhile (settings changed): the new one
            engine = await ls.host.get()
    except EngineUnavailable:
        return  # reported by config.report_load; nothing to prefill
    for uri, doc in list(ls.workspace.text_documents.items()):
        if documents.language_enabled(ls, doc):
            engine.prefill(uri, doc.source, extra=other_documents(ls, uri))
    logger.debug("idle prefill scheduled for %d open documents", len(ls.workspace.text_documents))

