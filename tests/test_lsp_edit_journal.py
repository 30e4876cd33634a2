"""The language server's side of next-edit prediction that needs no model: the didChange journal that
feeds the engine's edit history (character offsets from UTF-16/UTF-8 ranges), positions of character
offsets, and which suggested edit an inline completion can carry."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from lsprotocol import types as t
from pygls.workspace import PositionCodec

from dg_edit.edits import TextEdit
from dg_edit.lsp.documents import offset_at, position_at
from dg_edit.lsp.next_edit import at_cursor
from dg_edit.lsp.protocol import LspTextDocument

ALPHABET = "ab \n\r\t😀é€"  # astral (2 UTF-16 units, 4 UTF-8 bytes), BMP, CRLF pieces


def document(text: str, encoding=t.PositionEncodingKind.Utf16, incremental: bool = True) -> LspTextDocument:
    kind = t.TextDocumentSyncKind.Incremental if incremental else t.TextDocumentSyncKind.Full
    return LspTextDocument("file:///x.py", source=text, version=1, sync_kind=kind,
                           position_codec=PositionCodec(encoding))


def _offsets(text: str) -> list[int]:
    """Character offsets that an LSP position can name (not between \\r and \\n)."""
    return [k for k in range(len(text) + 1) if not (0 < k < len(text) and text[k - 1] == "\r" and text[k] == "\n")]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=20), st.data(),
       st.sampled_from([t.PositionEncodingKind.Utf16, t.PositionEncodingKind.Utf8, t.PositionEncodingKind.Utf32]))
def test_position_at_is_the_inverse_of_offset_at(text, data, encoding):
    doc = document(text, encoding)
    for k in _offsets(text):
        assert offset_at(doc, position_at(doc, k)) == k, (text, k)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=20), st.data(), st.text(alphabet=ALPHABET, max_size=5),
       st.sampled_from([t.PositionEncodingKind.Utf16, t.PositionEncodingKind.Utf8]))
def test_incremental_changes_are_journalled_as_character_edits(text, data, new, encoding):
    doc = document(text, encoding)
    offsets = _offsets(text)
    a = data.draw(st.sampled_from(offsets))
    b = data.draw(st.sampled_from([k for k in offsets if k >= a]))
    rng = t.Range(start=position_at(doc, a), end=position_at(doc, b))
    doc.apply_change(t.TextDocumentContentChangePartial(range=rng, text=new))
    [change] = doc.take_changes()
    assert (change.start, change.end, change.text, change.old_text, change.before) == (a, b, new, text[a:b], None)
    assert doc.source == text[:a] + new + text[b:]
    assert doc.take_changes() == []  # taken once


def test_full_changes_and_several_changes_in_one_notification():
    doc = document("def f(x):\n    return x\n")
    doc.apply_change(t.TextDocumentContentChangePartial(
        range=t.Range(start=t.Position(line=0, character=6), end=t.Position(line=0, character=7)), text="y"))
    doc.apply_change(t.TextDocumentContentChangeWholeDocument(text="def f(y):\n    return y\n"))
    doc.apply_change(t.TextDocumentContentChangeWholeDocument(text="def f(z):\n    return y\n"))
    first, second = doc.take_changes()
    assert (first.start, first.end, first.text, first.old_text) == (6, 7, "y", "x")
    # full syncs in a row are one change, from the text before the first to the text after the last
    assert (second.start, second.end, second.before, second.text) == (
        None, None, "def f(y):\n    return x\n", "def f(z):\n    return y\n")


def test_an_edit_at_the_end_of_the_file_appends():
    doc = document("a\n")
    doc.apply_change(t.TextDocumentContentChangePartial(
        range=t.Range(start=t.Position(line=1, character=0), end=t.Position(line=1, character=0)), text="b"))
    [change] = doc.take_changes()
    assert (change.start, change.end) == (2, 2) and doc.source == "a\nb"


def test_only_an_edit_covering_the_cursor_on_its_line_can_be_an_inline_item():
    source = "total = count + 1\nprint(count)\n"
    cursor = source.index("count + 1") + 2  # inside "count" on line 0
    on_line = TextEdit(start=8, end=13, text="total", old_text="count")
    elsewhere = TextEdit(start=24, end=29, text="total", old_text="count")
    multiline = TextEdit(start=8, end=13, text="a\nb", old_text="count")
    assert at_cursor(source, cursor, (elsewhere, on_line)) == on_line
    assert at_cursor(source, cursor, (elsewhere,)) is None
    assert at_cursor(source, cursor, (multiline,)) is None
    assert at_cursor(source, 0, (on_line,)) is None  # does not cover the cursor
