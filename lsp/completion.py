"""`textDocument/completion`: the infill as one completion item, for clients without inline completion.

The item's `textEdit` inserts the whole infill at the cursor (an empty range there, so no word
before the cursor is replaced); its label is the infill's first non-blank line. The list is marked
incomplete so the client asks again as the user types instead of filtering a stale infill.
"""

from __future__ import annotations

from typing import Any

from lsprotocol import types

from . import documents
from .progress import StepReporter
from .runner import infill_texts
from .state import DgEditServer

LABEL_CHARS = 60


def label_for(text: str) -> str:
    first = next((line for line in text.split("\n") if line.strip()), text)
    first = first.strip()
    return first if len(first) <= LABEL_CHARS else first[: LABEL_CHARS - 1] + "…"


async def completion(ls: DgEditServer, params: types.CompletionParams) -> types.CompletionList:
    uri = params.text_document.uri
    doc = documents.open_document(ls, uri)
    if not documents.language_enabled(ls, doc):
        return types.CompletionList(is_incomplete=True, items=[])
    cursor = documents.cursor_at(ls, uri, params.position)
    record: dict[str, Any] = {"kind": "completion", "uri": uri, "version": cursor.version,
                              "requestId": ls.protocol.msg_id}
    async with ls.tracked(uri, cursor.version, "completion"):
        with StepReporter(ls, uri, cursor.version, ls.protocol.msg_id, "dg-edit: completing",
                          params.work_done_token) as reporter:
            texts = await infill_texts(ls, cursor, 1, reporter, record)
            ls.check_current(uri, cursor.version)
    ls.stats.recent.append(record)
    here = cursor.range
    return types.CompletionList(is_incomplete=True, items=[
        types.CompletionItem(
            label=label_for(text),
            kind=types.CompletionItemKind.Snippet,
            detail="dg-edit infill",
            documentation=types.MarkupContent(kind=types.MarkupKind.Markdown, value=f"```\n{text}\n```"),
            sort_text="0",
            insert_text_format=types.InsertTextFormat.PlainText,
            text_edit=types.TextEdit(range=here, new_text=text),
        )
        for text in texts
    ])


def register(server: DgEditServer) -> None:
    server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(resolve_provider=False, work_done_progress=True))(completion)
