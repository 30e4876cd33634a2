"""Document sync and cursors: open and change share one handler; positions are checked, then
converted with pygls's position codec (whatever encoding `initialize` negotiated).

pygls keeps the text (incremental sync) before our handler runs; what we add is that a new
version makes every request still running for an older version stale (`DgEditServer.document_changed`),
and that closing a document drops its prefix cache in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.workspace import TextDocument

from .state import DgEditServer


@dataclass(frozen=True)
class Cursor:
    """A document split at the cursor, for one version of it."""

    uri: str
    version: int
    prefix: str
    suffix: str


def on_open_or_change(ls: DgEditServer, params: types.DidOpenTextDocumentParams | types.DidChangeTextDocumentParams):
    """didOpen and didChange: the text is already updated by pygls; older requests are now stale."""
    ls.document_changed(params.text_document.uri, params.text_document.version)


def on_close(ls: DgEditServer, params: types.DidCloseTextDocumentParams):
    uri = params.text_document.uri
    ls.document_changed(uri, None)
    engine = ls.host.loaded()
    if engine is not None:
        engine.forget(uri)


def open_document(ls: DgEditServer, uri: str) -> TextDocument:
    """The open document at `uri`; unknown documents are a client mistake (InvalidParams)."""
    doc = ls.workspace.text_documents.get(uri)
    if doc is None:
        raise JsonRpcInvalidParams(f"document not open: {uri} (send textDocument/didOpen first)")
    return doc


def language_enabled(ls: DgEditServer, doc: TextDocument) -> bool:
    languages = ls.settings.languages
    return "*" in languages or (doc.language_id or "") in languages


def offset_at(doc: TextDocument, position: types.Position) -> int:
    """Index into `doc.source` of a client position; positions outside the document raise InvalidParams.

    Valid positions: a line of the document and a character up to that line's length (without its
    line break), in the negotiated encoding; or the start of the line just after a final line break.
    """
    lines = doc.lines
    line, character = position.line, position.character
    if line == len(lines) and character == 0:  # the (empty) line after a final line break
        return len(doc.source)
    if line >= len(lines):
        raise JsonRpcInvalidParams(f"position {line}:{character} is outside the document ({len(lines)} lines)")
    text = lines[line].rstrip("\r\n")
    length = doc.position_codec.client_num_units(text)
    if character > length:
        raise JsonRpcInvalidParams(
            f"position {line}:{character} is past the end of line {line} ({length} {_unit_name(doc)})")
    server = doc.position_from_client_units(types.Position(line=line, character=character))
    return doc.offset_at_server_position(server)


def _unit_name(doc: TextDocument) -> str:
    encoding = doc.position_codec.encoding or types.PositionEncodingKind.Utf16
    return f"{encoding} code units"


def cursor_at(ls: DgEditServer, uri: str, position: types.Position) -> Cursor:
    doc = open_document(ls, uri)
    offset = offset_at(doc, position)
    source = doc.source
    return Cursor(uri=uri, version=doc.version, prefix=source[:offset], suffix=source[offset:])


def span_at(ls: DgEditServer, uri: str, rng: types.Range) -> tuple[Cursor, str]:
    """(prefix/suffix around a range, the text inside it) for a rewrite or a selected completion."""
    doc = open_document(ls, uri)
    start, end = offset_at(doc, rng.start), offset_at(doc, rng.end)
    if end < start:
        raise JsonRpcInvalidParams(f"range end {rng.end.line}:{rng.end.character} is before its start")
    source = doc.source
    return Cursor(uri=uri, version=doc.version, prefix=source[:start], suffix=source[end:]), source[start:end]


def register(server: DgEditServer) -> None:
    server.feature(types.TEXT_DOCUMENT_DID_OPEN)(on_open_or_change)
    server.feature(types.TEXT_DOCUMENT_DID_CHANGE)(on_open_or_change)
    server.feature(types.TEXT_DOCUMENT_DID_CLOSE)(on_close)
