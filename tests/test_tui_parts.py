"""The TUI's pure parts: file loading and atomic saving, ghost-text segments, the canvas grid."""

from __future__ import annotations

import os
import stat

import pytest

from dg_edit import Step, Token
from dg_edit.tui import files
from dg_edit.tui.canvas_panel import cell_states, cell_text, clamped_count
from dg_edit.tui.dialogs import parse_strength
from dg_edit.tui.ghost import clean_model_text, diff_segments, step_segments


# ---------------------------------------------------------------------------------------------- files
def test_load_text_reads_utf8_and_fingerprints(tmp_path):
    p = tmp_path / "a.py"
    p.write_bytes("x = 'é'\r\n".encode())
    loaded = files.load_text(p)
    assert loaded.text == "x = 'é'\r\n"
    assert loaded.fingerprint == files.fingerprint(p)
    assert not files.changed_on_disk(p, loaded.fingerprint)
    p.write_text("y = 1\n")
    assert files.changed_on_disk(p, loaded.fingerprint)
    p.unlink()
    assert files.changed_on_disk(p, loaded.fingerprint)
    assert not files.changed_on_disk(p, None)


@pytest.mark.parametrize("setup,kind", [
    (lambda d: d / "missing.py", "missing"),
    (lambda d: d / "no" / "such" / "dir.py", "unreadable"),
    (lambda d: d, "directory"),
])
def test_load_text_problems(tmp_path, setup, kind):
    with pytest.raises(files.FileProblem) as info:
        files.load_text(setup(tmp_path))
    assert info.value.kind == kind
    assert str(tmp_path) in info.value.message


def test_load_text_refuses_binary_and_non_utf8(tmp_path):
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"abc\x00def")
    with pytest.raises(files.FileProblem, match="binary") as info:
        files.load_text(binary)
    assert info.value.kind == "binary"
    latin = tmp_path / "l.txt"
    latin.write_bytes(b"ok\nna\xefve\n")
    with pytest.raises(files.FileProblem, match="offset 5") as info:
        files.load_text(latin)
    assert info.value.kind == "not_utf8"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_load_text_unreadable(tmp_path):
    p = tmp_path / "secret.py"
    p.write_text("x")
    p.chmod(0)
    with pytest.raises(files.FileProblem) as info:
        files.load_text(p)
    assert info.value.kind == "unreadable"


def test_atomic_write_keeps_mode_and_leaves_no_temp(tmp_path):
    p = tmp_path / "script.sh"
    p.write_text("old\n")
    p.chmod(0o751)
    fp = files.atomic_write(p, "new ✓\n")
    assert p.read_text(encoding="utf-8") == "new ✓\n"
    assert stat.S_IMODE(p.stat().st_mode) == 0o751
    assert fp == files.fingerprint(p)
    assert os.listdir(tmp_path) == ["script.sh"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "a.py"
    p.write_text("precious\n")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError):
        files.atomic_write(p, "half")
    assert p.read_text() == "precious\n"
    assert os.listdir(tmp_path) == ["a.py"]


# ---------------------------------------------------------------------------------------------- ghost text
def test_step_segments_style_each_token():
    step = Step(index=2, total=8, text="def f(x):",
                tokens=(Token("f", True, 0.9), Token("(x", False, 0.7), Token("):", False, 0.1)))
    segs = step_segments(step)
    assert "".join(s.text for s in segs) == "def f(x):"
    assert [(s.text, s.style) for s in segs] == [("def f", "settled"), ("(x", "tentative"), ("):", "faint")]


def test_step_segments_fall_back_when_tokens_do_not_spell_the_text():
    step = Step(index=1, total=8, text="é!", tokens=(Token("\ufffd", True, 0.9), Token("!", True, 0.9)))
    segs = step_segments(step)
    assert "".join(s.text for s in segs) == "é!"


def test_diff_segments_rebuild_both_sides():
    original, final = "return a + b\n", "return a - b  # sub\n"
    segs = diff_segments(original, final)
    assert "".join(s.text for s in segs if s.style != "inserted") == original
    assert "".join(s.text for s in segs if s.style != "deleted") == final
    assert {s.style for s in segs} == {"settled", "deleted", "inserted"}


def test_clean_model_text_only_leaves_what_the_buffer_keeps():
    assert clean_model_text("a\r\nb\rc\td") == "a\nb\nc\td"
    cleaned = clean_model_text("x\x0cy\x1cz\u2028w\x00")
    assert cleaned.splitlines() == [cleaned]  # nothing the document would split on
    assert cleaned == "x\ufffdy\ufffdz\ufffdw\ufffd"


@pytest.mark.parametrize("text,value", [("", 0.6), ("0", 0.0), (" 1 ", 1.0), ("0.25", 0.25)])
def test_parse_strength(text, value):
    assert parse_strength(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["-0.1", "1.5", "lots", "nan"])
def test_parse_strength_rejects(text):
    with pytest.raises(ValueError, match="strength"):
        parse_strength(text)


# ---------------------------------------------------------------------------------------------- canvas grid
def test_canvas_states_mark_settled_noise_slack_and_clamped():
    step = Step(index=1, total=4, text="ab", tokens=(Token("a", True, 0.9), Token("b", False, 0.2)),
                canvas=(10, 99, 1, 0, 7, 8))
    assert clamped_count(step, (7, 8)) == 2
    assert clamped_count(step, (7, 9)) == 0  # the tail is not the suffix: this block has none
    assert cell_states(step, 2) == ["settled", "noise", "slack", "slack", "clamped", "clamped"]
    assert cell_text("\n").startswith("⏎") and len(cell_text("a very long token")) == len(cell_text("x"))


def test_step_mailbox_keeps_only_the_newest_step():
    from dg_edit.tui.app import StepMailbox

    box = StepMailbox()
    first, second = Step(index=1, total=4, text="a"), Step(index=2, total=4, text="ab")
    assert box.put(7, first) is True  # empty: the UI must be told
    assert box.put(7, second) is False  # a message is already on its way
    assert box.take() == (7, second)
    assert box.take() is None
    assert box.put(8, first) is True
