"""Context from the other open documents: what llama.vim's ring of chunks (llama.cpp's `input_extra`)
is to a llama.cpp server, the editor's other open files are to the language server.

Each other open document of an enabled language gives one chunk: its first `CHUNK_LINES` lines
(imports, constants, the definitions a file starts with), written by `dg_edit.extra.extra_chunk`
under its path. Chunks are ordered by URI, so the list only changes when a document is opened,
closed or edited there, and the engine's prefix cache keeps them while the user types in this one.
The engine keeps whole chunks within `Settings.max_extra_tokens` (0: no context from other files).
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from dg_edit.extra import extra_chunk

from . import documents
from .state import DgEditServer

CHUNK_LINES = 64
CHUNK_CHARS = 4096  # a minified file's first lines can be huge: cut, whole lines kept
MAX_DOCUMENTS = 16


def other_documents(ls: DgEditServer, uri: str) -> tuple[str, ...]:
    """Chunks of the open documents other than `uri`, for the engine's `extra`."""
    if ls.settings.max_extra_tokens <= 0:
        return ()
    chunks = []
    for other in sorted(ls.workspace.text_documents):
        doc = ls.workspace.text_documents[other]
        if other == uri or not documents.language_enabled(ls, doc):
            continue
        head = _head(doc.source)
        if head.strip():
            chunks.append(extra_chunk(head, _display_name(other)))
    return tuple(chunks[-MAX_DOCUMENTS:])


def _head(source: str) -> str:
    """The first CHUNK_LINES whole lines, at most CHUNK_CHARS (only the start of a huge file is read)."""
    lines = source[: CHUNK_CHARS + 1].splitlines(keepends=True)[:CHUNK_LINES]
    head = "".join(lines)
    if len(head) > CHUNK_CHARS:  # the last line is cut: drop it, unless it is the only one
        head = "".join(lines[:-1]) or head[:CHUNK_CHARS]
    return head


def _display_name(uri: str) -> str:
    """A file URI's path (what a user would call the file); other URIs as they are."""
    parts = urlsplit(uri)
    return unquote(parts.path) if parts.scheme == "file" else uri
