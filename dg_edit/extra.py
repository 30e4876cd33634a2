"""Chunks of other files as context for a request: how each front end writes them for the engine.

Editors know more than the file being edited: llama.vim keeps a ring of chunks from recently
visited files and sends them as llama.cpp's `input_extra`; the language server has the other open
documents. The engine takes such chunks as plain texts (`extra=`) and encodes them ahead of the
prefix, within `Settings.max_extra_tokens`. `extra_chunk` is the one place where a chunk's text is
written, so that the same chunk gives the same tokens (and the same prefix-cache entry) from every
front end. The model has no repository tokens (DiffusionGemma uses no FIM or file-separator tokens),
so a chunk is the file's name on a comment line, then its text, ending with a newline.
"""

from __future__ import annotations


def extra_chunk(text: str, filename: str | None = None) -> str:
    """One chunk as the encoder reads it: `# file: NAME` (when named), then the text, newline-terminated."""
    body = text if text.endswith("\n") or not text else text + "\n"
    return f"# file: {filename}\n{body}" if filename else body
