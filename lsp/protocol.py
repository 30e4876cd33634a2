"""Protocol-level fixes on top of pygls's `LanguageServerProtocol`.

1. Invalid params get an answer. pygls structures each incoming message while parsing it; when a
   request's params do not fit the method's lsprotocol type it logs the failure and drops the
   message, so the client waits forever. Here the request is answered with -32602 InvalidParams and
   a readable reason, and the server carries on.
2. Position encoding: the issue asks for UTF-8 whenever the client offers it (UTF-16, the LSP
   default, otherwise). pygls picks the client's first supported choice, so UTF-8 is moved to the
   front of the offer before pygls negotiates; the conversion itself stays pygls's `PositionCodec`.
3. Lines as LSP counts them. pygls splits documents with `str.splitlines`, which also breaks lines
   at form feeds, vertical tabs, \x1c-\x1e, \x85 and U+2028/U+2029; LSP clients break lines only
   at \n, \r\n and \r. With such a character in a file, every position after it (and every
   incremental edit) landed on the wrong line. `LspTextDocument.lines` splits as LSP does.
4. The edits themselves. pygls applies each didChange content change to its copy of the text before
   any handler runs, so the text an edit replaced is gone by then. `LspTextDocument.apply_change`
   keeps a journal of `Change`s (character offsets into the text before each change, and the text
   replaced), which the didChange handler drains for the engine's edit history
   (`next_edit.record_changes`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Sequence

import cattrs
from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method
from pygls.workspace import TextDocument, Workspace

logger = logging.getLogger(__name__)


def _reason(exc: BaseException) -> str:
    """A one-line account of why params did not structure (cattrs keeps the detail in the cause)."""
    cause = exc.__cause__
    if isinstance(cause, cattrs.ClassValidationError):
        return "; ".join(m.replace("@ $.params", "@ params") for m in cattrs.transform_error(cause, path="$"))
    return str(cause or exc) or type(exc).__name__


_LSP_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


@dataclass(frozen=True)
class Change:
    """One applied content change: `old_text` at [start, end) became `text` (offsets in characters of
    the text before it). A full sync has start = end = None and keeps that whole text in `before`."""

    start: int | None
    end: int | None
    text: str
    old_text: str = ""
    before: str | None = None


_JOURNAL_MAX = 64  # changes kept until the handler takes them (more while the model loads)


class LspTextDocument(TextDocument):
    _lines_of: str | None = None
    _lines: tuple[str, ...] = ()
    _journal: list[Change] | None = None

    def apply_change(self, change: types.TextDocumentContentChangeEvent) -> None:
        """pygls's change, journalled first (offsets in Python characters)."""
        before = self.source
        if isinstance(change, types.TextDocumentContentChangePartial) and self._is_sync_kind_incremental:
            start, end = self._offset(change.range.start), self._offset(change.range.end)
            entry = Change(start, end, change.text, old_text=before[start:end])
        else:
            entry = Change(None, None, change.text, before=before)
        super().apply_change(change)
        if self._journal is None:
            self._journal = []
        journal = self._journal
        if entry.before is not None and journal and journal[-1].before is not None:
            # full syncs in a row: one change from the first text to the last (two copies at most)
            entry = Change(None, None, entry.text, before=journal.pop().before)
        journal.append(entry)
        del journal[:-_JOURNAL_MAX]

    def take_changes(self) -> list[Change]:
        """The changes applied since the last call (oldest first), and forget them."""
        journal, self._journal = self._journal or [], None
        return journal

    def _offset(self, position: types.Position) -> int:
        # The line after the last one is where pygls appends (an edit "at the very end of the file").
        if position.line >= len(self.lines):
            return len(self.source)
        return self.offset_at_position(position)

    @property
    def lines(self) -> Sequence[str]:
        """Lines with their endings, broken only at \\n, \\r\\n and \\r (the LSP definition).

        Cached per text: a request looks lines up several times, and a 10 MB file takes a while to split.
        """
        source = self.source
        if source is not self._lines_of:
            self._lines_of, self._lines = source, tuple(_LSP_LINE.findall(source))
        return self._lines


class LspWorkspace(Workspace):
    def _create_text_document(self, doc_uri, source=None, version=None, language_id=None) -> TextDocument:
        return LspTextDocument(doc_uri, source=source, version=version, language_id=language_id,
                               sync_kind=self._sync_kind, position_codec=self._position_codec)


class DgEditProtocol(LanguageServerProtocol):
    def structure_message(self, data: dict[str, Any]):
        # pygls runs this as json's object_hook, so it also sees every object nested in params; one
        # that merely has a "jsonrpc" key ({"jsonrpc": 400} in a fuzzed position) is not a message.
        if not (isinstance(data.get("jsonrpc"), str) and ("method" in data or "id" in data)):
            return data
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            if "id" in data and "method" in data:
                # A request: the client is waiting for this id. Answer it, then let pygls log the failure.
                error = JsonRpcInvalidParams(f"invalid params for {data['method']}: {_reason(exc)}")
                self._send_response(data["id"], error=error.to_response_error())
                raise
            if "method" in data:  # a notification that does not fit its type: pygls logs and drops it
                raise
            future = self._request_futures.pop(data.get("id"), None)
            if future is not None:  # a malformed answer to one of our requests: fail that request
                future.set_exception(JsonRpcInvalidParams(f"malformed response from the client: {_reason(exc)}"))
            return data  # (or nested junk: let the outer message decide)

    @lsp_method(types.WORKSPACE_EXECUTE_COMMAND)
    def lsp_workspace__execute_command(self, params: types.ExecuteCommandParams):
        # pygls calls a command handler without its arguments when `arguments` is absent, and the
        # resulting TypeError is answered as InternalError; as an empty list, pygls answers
        # InvalidParams ("Expected 1 arguments, got 0"). Found by tests/fuzz/test_fuzz_lsp.py.
        if params.arguments is None:
            params.arguments = []
        return (yield from super().lsp_workspace__execute_command(params))

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams):
        general = params.capabilities.general
        offered = list(general.position_encodings or []) if general is not None else []
        if types.PositionEncodingKind.Utf8 in offered:
            offered.remove(types.PositionEncodingKind.Utf8)
            general.position_encodings = [types.PositionEncodingKind.Utf8, *offered]
        result = yield from super().lsp_initialize(params)
        # pygls built its Workspace above; the same one, creating documents that split lines as LSP does.
        ws = self._workspace
        self._workspace = LspWorkspace(ws.root_uri, ws._sync_kind, list(ws.folders.values()), ws.position_encoding)
        return result
