"""`textDocument/inlineCompletion` (LSP 3.18): ghost text that fits the code before and after the cursor.

- Automatic trigger (typing): one item. Invoked (the user asked): up to `settings.candidates`
  distinct items from other seeds.
- `context.selectedCompletionInfo` (the completion widget is open): the spec requires items that
  extend the selected item's text and use its range, so the infill is computed as if that text
  were already in the document, and each item is `selected.text + infill` over `selected.range`.
  Otherwise each item is inserted at the cursor (an empty range there).
- Each item carries the command `dg-edit.accepted` (arguments `[{uri, version, requestId, index,
  length}]`), which the editor runs when the user accepts it; the server counts acceptances.
- A suggested next edit (`next_edit.py`) already computed for this version and cursor, on the
  cursor's line and covering the cursor, comes back as one more item (the last), with the edit's
  `range` and arguments `kind: "next_edit"`. It is never computed here: a completion must not wait
  for a second model call.
- Documents whose languageId is not enabled (`settings.languages`) get an empty list.
"""

from __future__ import annotations

from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

from . import documents, next_edit
from .progress import StepReporter
from .runner import infill_texts
from .state import DgEditServer

ACCEPTED = "dg-edit.accepted"


async def inline_completion(ls: DgEditServer, params: types.InlineCompletionParams) -> types.InlineCompletionList:
    uri = params.text_document.uri
    selected = params.context.selected_completion_info
    doc = documents.open_document(ls, uri)
    if not documents.language_enabled(ls, doc):
        return types.InlineCompletionList(items=[])
    if selected is not None:
        if selected.range.start.line != selected.range.end.line:
            raise JsonRpcInvalidParams("selectedCompletionInfo.range must be on one line")
        around, _ = documents.span_at(ls, uri, selected.range)
        cursor = documents.Cursor(uri, around.version, around.prefix + selected.text, around.suffix, around.range)
        rng, lead = selected.range, selected.text
    else:
        cursor = documents.cursor_at(ls, uri, params.position)
        rng, lead = cursor.range, ""
    invoked = params.context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
    count = ls.settings.candidates if invoked else 1
    record: dict[str, Any] = {"kind": "inline", "uri": uri, "version": cursor.version,
                              "requestId": ls.protocol.msg_id}
    async with ls.tracked(uri, cursor.version, "inline"):
        with StepReporter(ls, uri, cursor.version, ls.protocol.msg_id, "dg-edit: completing",
                          params.work_done_token) as reporter:
            texts = await infill_texts(ls, cursor, count, reporter, record)
            ls.check_current(uri, cursor.version)
        edit = _edit_at_cursor(ls, cursor) if selected is None else None
    record["items"] = len(texts) + (edit is not None)
    ls.stats.recent.append(record)
    items = [types.InlineCompletionItem(
        insert_text=edit.text, range=next_edit.lsp_range(doc, edit),
        command=types.Command(title="dg-edit: next edit accepted", command=ACCEPTED, arguments=[
            {"uri": uri, "version": cursor.version, "requestId": ls.protocol.msg_id, "kind": "next_edit",
             "index": 0, "length": len(edit.text)}]))] if edit is not None else []
    return types.InlineCompletionList(items=[
        types.InlineCompletionItem(
            insert_text=lead + text,
            range=rng,
            command=types.Command(
                title="dg-edit: completion accepted", command=ACCEPTED,
                arguments=[{"uri": uri, "version": cursor.version, "requestId": ls.protocol.msg_id,
                            "index": i, "length": len(lead + text)}]),
        )
        for i, text in enumerate(texts)
    ] + items)


def _edit_at_cursor(ls: DgEditServer, cursor: documents.Cursor):
    """The remembered next-edit suggestion covering the cursor, if any (no model call)."""
    offset = len(cursor.prefix)
    edits = next_edit.recalled(ls, cursor.uri, cursor.version, offset) or ()
    return next_edit.at_cursor(cursor.prefix + cursor.suffix, offset, edits)


def accepted(ls: DgEditServer, *args: Any) -> None:
    """`dg-edit.accepted`: the user took an inline completion (counted in `dgEdit/stats`)."""
    ls.stats.accepted += 1
    ls.stats.recent.append({"kind": "accepted", **(args[0] if args and isinstance(args[0], dict) else {})})
    return None


def register(server: DgEditServer) -> None:
    server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions(work_done_progress=True))(inline_completion)
    server.command(ACCEPTED)(accepted)
