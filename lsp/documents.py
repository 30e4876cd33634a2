"""Document sync and cursors: open and change share one handler; positions are checked, then
converted with pygls's position codec (whatever encoding `initialize` negotiated).

pygls keeps the text (incremental sync) before our handler runs; what we add is that a new
version makes every request still running for an older version stale (`DgEditServer.document_changed`),
that the new text goes to idle prefill (`prefill.schedule`), and that closing a document drops its
caches in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.workspace import TextDocument

from . import next_edit, prefill
from .state import DgEditServer


@dataclass(frozen=True)
class Cursor:
    """A document split at the cursor (or around a range), for one version of it."""

    uri: str
    version: int
    prefix: str
    suffix: str
    range: types.Range | None = None  # where the split is (empty for a cursor)


def on_open_or_change(ls: DgEditServer, params: types.DidOpenTextDocumentParams | types.DidChangeTextDocumentParams):
    """didOpen and didChange: the text is already updated by pygls; older requests are now stale, the
    edits go to the engine's history, and once the editor is quiet the new text is prefilled and the
    next edit prepared."""
    ls.document_changed(params.text_document.uri, params.text_document.version)
    if isinstance(params, types.DidChangeTextDocumentParams):
        next_edit.record_changes(ls, params.text_document.uri)
        next_edit.prepare(ls, params.text_document.uri)
    if isinstance(params, types.DidOpenTextDocumentParams):
        prefill.schedule_all(ls)  # a new document is context for the others (`context`)
    prefill.schedule(ls, params.text_document.uri)  # last: the most recent, prefilled first


def on_close(ls: DgEditServer, params: types.DidCloseTextDocumentParams):
    uri = params.text_document.uri
    ls.document_changed(uri, None)
    next_edit.forget(ls, uri)
    engine = ls.host.loaded()
    if engine is not None:
        engine.forget(uri)
        prefill.schedule_all(ls)  # the others lost this document from their context


def open_document(ls: DgEditServer, uri: str) -> TextDocument:
    """The open document at `uri`; unknown documents are a client mistake (InvalidParams)."""
    doc = ls.workspace.text_documents.get(uri)
    if doc is None:
        raise JsonRpcInvalidParams(f"document not open: {uri} (send textDocument/didOpen first)")
    return doc


def language_enabled(ls: DgEditServer, doc: TextDocument) -> bool:
    languages = ls.settings.languages
    return "*" in languages or (doc.language_id or "") in languages


def checked(doc: TextDocument, position: types.Position) -> types.Position:
    """`position` if it is inside the document, else InvalidParams.

    Inside: a line of the document and a character up to that line's length (without its line
    break), in the negotiated encoding; or the start of the (empty) line after a final line break.
    The spec would read a character past the line's end as the line's end; we answer an error
    instead, because an editor only sends one when its copy of the text and ours differ, and a
    completion placed by guesswork would land in the wrong spot.
    """
    lines = doc.lines
    line, character = position.line, position.character
    if line == len(lines) and character == 0 and (not lines or lines[-1].endswith(("\n", "\r"))):
        return position
    if line >= len(lines):
        raise JsonRpcInvalidParams(f"position {line}:{character} is outside the document ({len(lines)} lines)")
    length = doc.position_codec.client_num_units(lines[line].rstrip("\r\n"))
    if character > length:
        raise JsonRpcInvalidParams(
            f"position {line}:{character} is past the end of line {line} ({length} {_unit_name(doc)})")
    return position


def _unit_name(doc: TextDocument) -> str:
    encoding = doc.position_codec.encoding or types.PositionEncodingKind.Utf16
    return f"{encoding} code units"


def offset_at(doc: TextDocument, position: types.Position) -> int:
    """Index into `doc.source` of a client position (in the negotiated encoding), via pygls's codec."""
    position = checked(doc, position)
    if position.line == len(doc.lines):
        return len(doc.source)
    return doc.offset_at_server_position(doc.position_from_client_units(position))


def position_at(doc: TextDocument, offset: int) -> types.Position:
    """The client position (negotiated encoding) of index `offset` into `doc.source`; the end of the
    text is the end of its last line (pygls's own conversion puts it on a line past the end)."""
    row, start = 0, 0
    lines = doc.lines
    for row, line in enumerate(lines):
        content = len(line.rstrip("\r\n"))
        if offset <= start + content or row == len(lines) - 1 and offset <= start + len(line):
            break
        start += len(line)
    else:
        return types.Position(line=0, character=0)
    if offset > start + len(lines[row].rstrip("\r\n")):  # after the final line break
        return types.Position(line=row + 1, character=0)
    column = doc.position_codec.client_num_units(lines[row][: offset - start])
    return types.Position(line=row, character=column)


def cursor_at(ls: DgEditServer, uri: str, position: types.Position) -> Cursor:
    doc = open_document(ls, uri)
    here = checked(doc, position)
    offset = offset_at(doc, here)
    source = doc.source
    return Cursor(uri=uri, version=doc.version, prefix=source[:offset], suffix=source[offset:],
                  range=types.Range(start=here, end=here))


def span_at(ls: DgEditServer, uri: str, rng: types.Range) -> tuple[Cursor, str]:
    """(prefix/suffix around a range, the text inside it) for a rewrite or a selected completion."""
    doc = open_document(ls, uri)
    start_pos, end_pos = checked(doc, rng.start), checked(doc, rng.end)
    start, end = offset_at(doc, start_pos), offset_at(doc, end_pos)
    if end < start:
        raise JsonRpcInvalidParams(f"range end {rng.end.line}:{rng.end.character} is before its start")
    source = doc.source
    cursor = Cursor(uri=uri, version=doc.version, prefix=source[:start], suffix=source[end:],
                    range=types.Range(start=start_pos, end=end_pos))
    return cursor, source[start:end]


def register(server: DgEditServer) -> None:
    server.feature(types.TEXT_DOCUMENT_DID_OPEN)(on_open_or_change)
    server.feature(types.TEXT_DOCUMENT_DID_CHANGE)(on_open_or_change)
    server.feature(types.TEXT_DOCUMENT_DID_CLOSE)(on_close)
