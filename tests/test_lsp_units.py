"""Language-server pieces that need no model: suffix-overlap trimming, settings parsing, cursor
offsets in every position encoding, and the command line's refusal of a missing model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lsprotocol import types as t
from pygls.exceptions import JsonRpcInvalidParams
from pygls.workspace import PositionCodec, TextDocument

from dg_edit.config import Settings
from dg_edit.lsp import config
from dg_edit.lsp.documents import offset_at
from dg_edit.lsp.runner import trim_suffix_overlap


def test_trim_drops_a_repeated_rest_of_line():
    assert trim_suffix_overlap("foo(a, b))", ")\nnext()\n") == "foo(a, b)"
    assert trim_suffix_overlap("x + 1\n\ndef main():", "\n\ndef main():\n    pass\n") == "x + 1"
    # the whole suffix written out again
    assert trim_suffix_overlap("a\nb\n", "b\n") == "a\n"


def test_trim_keeps_what_is_not_a_line_overlap():
    assert trim_suffix_overlap("foo(", "(bar)\n") == "foo("  # "(" is not the whole rest of the line
    assert trim_suffix_overlap("value  ", "  \n") == "value  "  # whitespace-only overlap
    assert trim_suffix_overlap("", ")\n") == ""
    assert trim_suffix_overlap("abc", "") == "abc"


@given(st.text(alphabet="ab()\n ", max_size=12), st.text(alphabet="ab()\n ", max_size=12))
def test_trim_result_is_a_prefix_and_never_ends_with_the_rest_of_a_line(text, suffix):
    out = trim_suffix_overlap(text, suffix)
    assert text.startswith(out)
    first_line = suffix.split("\n", 1)[0]
    if first_line.strip() and len(text) >= len(first_line) and text.endswith(first_line):
        assert not out.endswith(first_line) or out != text


def test_settings_flat_or_in_section_and_unknown_keys():
    base = Settings(max_new_tokens=20)
    s = config.parse({"candidates": 2, "max_denoising_steps": 12}, base)
    assert s.candidates == 2 and s.max_new_tokens == 20 and s.sampling["max_denoising_steps"] == 12
    assert config.parse({"dgEdit": {"languages": ["python"]}, "editor": {}}, base).languages == ("python",)
    assert config.parse(None, base) is base
    with pytest.raises(ValueError, match="bogus"):
        config.parse({"bogus": 1}, base)
    with pytest.raises(ValueError):
        config.parse({"candidates": "three"}, base)


@pytest.mark.parametrize("encoding,units", [
    (t.PositionEncodingKind.Utf16, lambda s: len(s.encode("utf-16-le")) // 2),
    (t.PositionEncodingKind.Utf8, lambda s: len(s.encode("utf-8"))),
    (t.PositionEncodingKind.Utf32, len),
])
def test_offsets_in_each_encoding(encoding, units):
    text = "a = '😀漢字'  # é\nb\n"
    doc = TextDocument("file:///x.py", text, version=1, position_codec=PositionCodec(encoding))
    line0 = text.split("\n")[0]
    for cut in range(len(line0) + 1):
        assert offset_at(doc, t.Position(line=0, character=units(line0[:cut]))) == cut
    assert offset_at(doc, t.Position(line=1, character=1)) == len(line0) + 2
    assert offset_at(doc, t.Position(line=2, character=0)) == len(text)
    for bad in (t.Position(line=3, character=0), t.Position(line=40, character=2), t.Position(line=2, character=1)):
        with pytest.raises(JsonRpcInvalidParams, match="outside the document"):
            offset_at(doc, bad)
    with pytest.raises(JsonRpcInvalidParams, match="past the end of line"):
        offset_at(doc, t.Position(line=0, character=units(line0) + 1))


def test_last_line_without_a_line_break_and_empty_documents():
    doc = TextDocument("file:///n.py", "x = 1", version=1)
    assert offset_at(doc, t.Position(line=0, character=5)) == 5
    with pytest.raises(JsonRpcInvalidParams):
        offset_at(doc, t.Position(line=1, character=0))  # there is no line after "x = 1"
    empty = TextDocument("file:///e.py", "", version=1)
    assert offset_at(empty, t.Position(line=0, character=0)) == 0
    for bad in (t.Position(line=0, character=1), t.Position(line=1, character=0)):
        with pytest.raises(JsonRpcInvalidParams):
            offset_at(empty, bad)


@pytest.mark.timeout(60)
def test_missing_model_exits_with_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dg_edit.lsp.server", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "model directory not found" in proc.stderr
    proc = subprocess.run(["dg-edit", "lsp", "--tcp", "nonsense"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr


def test_only_lsp_line_breaks_split_lines():
    """Form feeds and U+2028 are not line breaks for an LSP client; \\r\\n and \\r are."""
    from dg_edit.lsp.protocol import LspTextDocument

    text = "a = 1\x0c# page\u2028two\nb = 2\r\nc = 3\rd"
    doc = LspTextDocument("file:///lines.py", text, version=1)
    assert len(doc.lines) == 4
    assert offset_at(doc, t.Position(line=1, character=0)) == text.index("b = 2")
    assert offset_at(doc, t.Position(line=3, character=1)) == len(text)
    assert offset_at(doc, t.Position(line=0, character=16)) == text.index("\n")  # the form feed is inside
    doc.apply_change(t.TextDocumentContentChangePartial(
        range=t.Range(start=t.Position(line=2, character=0), end=t.Position(line=2, character=1)), text="C"))
    assert doc.source == text.replace("c = 3", "C = 3")
