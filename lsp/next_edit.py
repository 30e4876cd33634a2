"""Next-edit suggestions: `textDocument/copilotInlineEdit`, the edit history that aims them, and their
preparation while the editor is quiet.

- Edit history: every didChange content change (offsets converted from the negotiated encoding by
  pygls's codec and journalled by `protocol.LspTextDocument`) goes to `Engine.record_edit` under the
  document's URI; full-text syncs are turned into minimal edits with `dg_edit.edits.diff_edits`.
- Preparation: after every edit the document goes to `Engine.prepare_next_edit` with the cursor at
  the end of the last edit (where an editor's cursor is after typing); the engine computes the
  suggestion in the background once the editor has been quiet for `idle_prefill_ms`, so that asking
  for it there answers at once (the record in `dgEdit/stats` says `prepared`).
- `textDocument/copilotInlineEdit` (the method Neovim's copilot-lsp and sidekick.nvim speak):
  params `{textDocument: {uri, version}, position}`, result `{edits: [{range, text, textDocument:
  {uri, version}, command}]}`. `command` is `dg-edit.accepted` (counted in `dgEdit/stats`, like an
  inline completion); a plug-in runs it when the user accepts. A version that is not the document's
  current one, or a document that changes while the model runs, gets `{edits: []}`: the edit would
  land on text that is gone. A failed model call is an LSP error (`runner.run_events`); the buffer is
  never touched by the server.
- `suggestion_at_cursor` lets inline completion offer a suggested edit that covers the cursor's line
  as an item with a `range` (`inline.py`).
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
from lsprotocol import converters, types
from pygls.exceptions import JsonRpcContentModified, JsonRpcInvalidParams

from dg_edit.edits import TextEdit, diff_edits

from . import documents
from .context import other_documents
from .progress import StepReporter
from .runner import run_events
from .state import DgEditServer

logger = logging.getLogger(__name__)

METHOD = "textDocument/copilotInlineEdit"
ACCEPTED = "dg-edit.accepted"  # the inline completion's command: one acceptance counter for both


@attrs.define
class InlineEditParams:
    text_document: types.VersionedTextDocumentIdentifier
    position: types.Position


# ---------------------------------------------------------------------------------------- history


def record_changes(ls: DgEditServer, uri: str) -> None:
    """Send the document's journalled content changes to the engine's edit history (didChange, and
    before a request). While the model loads they stay in the journal: the first edits after the
    editor starts are often the ones that aim the first suggestion."""
    doc = ls.workspace.text_documents.get(uri)
    engine = ls.host.loaded()
    if doc is None or engine is None or not hasattr(doc, "take_changes"):
        return
    last: TextEdit | None = None
    for change in doc.take_changes():
        if change.before is not None:
            # diff_edits indexes every edit into the old text: recorded from the last one back, each
            # edit's offsets still index the text just before it (what the history expects)
            edits = sorted(diff_edits(change.before, change.text), key=lambda e: e.start, reverse=True)
        else:
            edits = [TextEdit(start=change.start, end=change.end, text=change.text, old_text=change.old_text)]
        for edit in edits:
            try:
                engine.record_edit(uri, edit)
            except ValueError as e:  # text the engine refuses (a lone surrogate): not history, said in the log
                logger.info("edit of %s not recorded: %s", uri, e)
                continue
            last = edit
    if last is not None:
        ls.edit_cursor[uri] = last.start + len(last.text)


def prepare(ls: DgEditServer, uri: str) -> None:
    """Hand the engine the document as it is now, with the cursor where the last edit ended: it prepares
    the next edit once the editor is quiet (`Engine.prepare_next_edit`; a newer call replaces it)."""
    doc = ls.workspace.text_documents.get(uri)
    engine = ls.host.loaded()
    if doc is None or engine is None or uri not in ls.edit_cursor or not documents.language_enabled(ls, doc):
        return
    source = doc.source
    cursor = min(ls.edit_cursor[uri], len(source))
    try:
        engine.prepare_next_edit(uri, source, cursor, seed=0, sampling=dict(ls.settings.sampling),
                                 extra=other_documents(ls, uri))
    except ValueError as e:  # a text the engine refuses: a request there is answered with the reason
        logger.info("next edit of %s not prepared: %s", uri, e)


def forget(ls: DgEditServer, uri: str) -> None:
    """didClose: the document's last edit is forgotten (the engine drops its history in `Engine.forget`)."""
    ls.edit_cursor.pop(uri, None)


def history(ls: DgEditServer) -> list[dict] | None:
    """The engine's edit history of each open document, for `dgEdit/stats` (None while the model loads).

    A list of {uri, edits}: URIs as object keys would not survive clients that map objects to records."""
    engine = ls.host.loaded()
    if engine is None:
        return None
    return [{"uri": uri, "edits": [edit.to_json() for edit in engine.recent_edits(uri)]}
            for uri in ls.workspace.text_documents]


# ---------------------------------------------------------------------------------------- requests


async def suggest(ls: DgEditServer, uri: str, version: int, offset: int, reporter: StepReporter | None = None,
                  record: dict | None = None) -> tuple[TextEdit, ...]:
    """The engine's suggested edits for `uri` at `offset` in `version` (remembered per version and offset)."""
    key = (uri, version, offset)
    remembered = ls.next_edits.get(key)
    if remembered is not None:
        if record is not None:
            record.update(cached=True, steps=0, ms=0.0)
        return remembered
    engine = await ls.host.get()
    record_changes(ls, uri)  # edits made while the model loaded
    source = documents.open_document(ls, uri).source
    extra = other_documents(ls, uri)  # read on the loop, where the workspace changes
    done = await run_events(ls, lambda: engine.stream_next_edit(source, offset, session=uri, seed=0,
                                                                 sampling=dict(ls.settings.sampling), extra=extra),
                            reporter)
    edits = tuple(done.edits)
    if record is not None:
        record.update(cached=False, prepared=done.prepared, steps=done.steps, ms=round(done.ms, 1))
    if ls.current_version(uri) == version:
        ls.remember_next_edits(key, edits)
    return edits


def recalled(ls: DgEditServer, uri: str, version: int, offset: int) -> tuple[TextEdit, ...] | None:
    """A suggestion already computed for this place (no model call), else None."""
    return ls.next_edits.get((uri, version, offset))


def at_cursor(source: str, offset: int, edits: tuple[TextEdit, ...]) -> TextEdit | None:
    """The suggested edit that an inline completion can show: on the cursor's line, covering the cursor.

    Editors draw an inline completion with a range only within one line (VS Code requires it), and
    its text replaces that range, so only an edit from that line, touching the cursor, qualifies.
    """
    line_start = source.rfind("\n", 0, offset) + 1
    line_end = source.find("\n", offset)
    line_end = len(source) if line_end < 0 else line_end
    for edit in edits:
        if line_start <= edit.start <= offset <= edit.end <= line_end and "\n" not in edit.text:
            return edit
    return None


def lsp_range(doc, edit: TextEdit) -> types.Range:
    return types.Range(start=documents.position_at(doc, edit.start), end=documents.position_at(doc, edit.end))


async def copilot_inline_edit(ls: DgEditServer, params: Any) -> dict[str, Any]:
    args = _parse(params)
    token = _token(_json(params))
    uri, version = args.text_document.uri, args.text_document.version
    doc = documents.open_document(ls, uri)
    empty: dict[str, Any] = {"edits": []}
    if version != doc.version or not documents.language_enabled(ls, doc):
        return empty  # the editor's text is not ours (or not served): nothing would fit it
    offset = documents.offset_at(doc, args.position)
    request_id = ls.protocol.msg_id
    record: dict[str, Any] = {"kind": "next_edit", "uri": uri, "version": version, "requestId": request_id}
    try:
        async with ls.tracked(uri, version, "next_edit"):
            with StepReporter(ls, uri, version, request_id, "dg-edit: next edit", token,
                              kind="next_edit") as reporter:
                edits = await suggest(ls, uri, version, offset, reporter, record)
                reporter.done(edits[0].text if edits else "")
    except JsonRpcContentModified:
        record["stale"] = True
        ls.stats.recent.append(record)
        return empty
    record["edits"] = len(edits)
    ls.stats.recent.append(record)
    identifier = {"uri": uri, "version": version}
    return {"edits": [
        {"range": _json_range(lsp_range(doc, edit)), "text": edit.text, "textDocument": identifier,
         "command": {"title": "dg-edit: next edit accepted", "command": ACCEPTED,
                     "arguments": [{"uri": uri, "version": version, "requestId": request_id, "kind": "next_edit",
                                    "index": i, "length": len(edit.text)}]}}
        for i, edit in enumerate(edits)
    ]}


def _json(value: Any) -> Any:
    """pygls hands a custom method its params as nested namedtuples: back to JSON values."""
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {k: _json(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


def _parse(params: Any) -> InlineEditParams:
    """Structure the params as lsprotocol would structure a standard method's."""
    params = _json(params)
    if not isinstance(params, dict):
        raise JsonRpcInvalidParams(f"{METHOD} needs params {{textDocument: {{uri, version}}, position}}")
    try:
        converter = converters.get_converter()
        return InlineEditParams(
            text_document=converter.structure(params.get("textDocument"), types.VersionedTextDocumentIdentifier),
            position=converter.structure(params.get("position"), types.Position))
    except Exception as e:  # cattrs reports every shape error its own way: one InvalidParams for all
        raise JsonRpcInvalidParams(f"invalid params for {METHOD}: {e}") from None


def _token(params: dict) -> types.ProgressToken | None:
    token = params.get("workDoneToken")
    return token if isinstance(token, (str, int)) and not isinstance(token, bool) else None


def _json_range(rng: types.Range) -> dict:
    return {"start": {"line": rng.start.line, "character": rng.start.character},
            "end": {"line": rng.end.line, "character": rng.end.character}}


def register(server: DgEditServer) -> None:
    server.feature(METHOD)(copilot_inline_edit)
