"""End to end: the Neovim plug-in (editors/nvim) in a real headless Neovim 0.11 against the real
`dg-edit lsp` and the test model.

Each test runs one scenario of editors/nvim/tests/e2e.lua, which types keys through Neovim's
typeahead (so mappings, autocommands and timers run as for a person) and reports what it saw as
JSON; the assertions are here. The model's text is never judged, only where it lands.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from editor_tools import REPO, editor_tools, lsp_command, server_env

PLUGIN = REPO / "editors" / "nvim"
SCRIPT = PLUGIN / "tests" / "e2e.lua"

SOURCE = 'import math\n\n\ndef area(radius):\n    """Area of a circle."""\n    return \n\n\nprint(area(2.0))\n'
CURSOR_ROW = 6  # 1-based: the cursor goes to the end of "    return "


@pytest.fixture(scope="module")
def nvim() -> str:
    tools = editor_tools()
    out = subprocess.run([tools["nvim"], "--version"], capture_output=True, text=True, timeout=30).stdout
    assert out.startswith(f"NVIM v{tools['nvim_version']}"), out
    return tools["nvim"]


# name -> (source text, cursor row, extra options for the scenario)
REWRITE_SOURCE = "import os\nvalues = [x * 2 for x in range(10)]\nprint(values)\n"
RENAME_SOURCE = "def total_price(items):\n    count = 0\n    for item in items:\n        count += item.price\n    return count\n"
SCENARIOS = {
    "accept": {},
    "cancel_on_type": {},
    "stale_answer": {},
    "auto_trigger": {"auto_trigger": True, "debounce_ms": 50},
    "rewrite": {"source": REWRITE_SOURCE, "row": 2},
    "next_edit": {"source": RENAME_SOURCE, "row": 2, "next_edit": True, "next_edit_debounce_ms": 50},
    "next_edit_dismiss": {"source": RENAME_SOURCE, "row": 2, "next_edit": True, "next_edit_debounce_ms": 50},
}


@pytest.fixture(scope="module")
def session(nvim, model_dir, tmp_path_factory) -> dict:
    """Run every scenario of e2e.lua in one Neovim (one server, one model load); name -> observations.

    Neovim's didChange is held back for 20 s (`flags.debounce_text_changes`) so that in
    `stale_answer` the server answers before it hears of the edit. Every other request flushes
    pending changes first (Neovim does that before each request), so nothing else depends on it.
    """
    tmp_path = tmp_path_factory.mktemp("nvim-e2e")
    scenarios = []
    for name, options in SCENARIOS.items():
        options = dict(options)
        source = tmp_path / f"{name}.py"
        source.write_text(options.pop("source", SOURCE))
        scenarios.append({"name": name, "file": str(source), "row": options.pop("row", CURSOR_ROW), **options})
    out = tmp_path / "results.json"
    spec = {"cmd": lsp_command(model_dir), "out": str(out), "scenarios": scenarios,
            "lsp": {"flags": {"debounce_text_changes": 20000}}}
    env = server_env()
    env["DG_EDIT_E2E"] = json.dumps(spec)
    env["XDG_STATE_HOME"] = str(tmp_path / "state")  # the LSP log goes here, not to ~
    proc = subprocess.run(
        [nvim, "--headless", "--clean", "--cmd", f"set rtp^={PLUGIN}", "-c", f"luafile {SCRIPT}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.exists(), f"nvim wrote no result (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    results = json.loads(out.read_text())
    assert "_error" not in results, results["_error"] + "\n" + _lsp_log(tmp_path)
    results["_log"] = _lsp_log(tmp_path)
    return results


def scenario(session: dict, name: str) -> dict:
    obs = session[name]
    assert "error" not in obs, obs["error"] + "\n" + session["_log"]
    return obs


def _lsp_log(tmp_path: Path) -> str:
    log = tmp_path / "state" / "nvim" / "lsp.log"
    return log.read_text()[-4000:] if log.exists() else ""


@pytest.mark.timeout(600)
def test_suggestion_is_drawn_from_the_server_and_tab_accepts_it(session):
    obs = scenario(session, "accept")
    assert obs["has_native_inline_completion"] is False  # 0.11: the plug-in's own path is tested
    before = obs["before"]
    prefix, suffix = before[: before.index("return ") + len("return ")], before[before.index("return ") + 7:]
    ghost = obs["ghost"]
    assert ghost, "no ghost text drawn"
    # The ghost text is the server's answer for the version on screen, not something made up.
    assert obs["shown_text"] == obs["server_final_text"]
    assert ghost == obs["shown_text_displayed"]
    assert obs["shown_version"] == obs["version_at_ghost"]
    assert obs["canvas_steps"] >= 2  # at least one refining draft before the final text
    # Ghost text lives in extmarks only: the buffer is untouched until accepted.
    assert obs["buffer_while_ghost"] == before
    # <Tab> inserts exactly the suggestion at the cursor and puts the cursor after it.
    text = obs["shown_text"]
    assert obs["after"] == prefix + text + suffix
    assert obs["ghost_after_accept"] == ""
    inserted_lines = (prefix + text).split("\n")
    assert obs["cursor_after_accept"] == [len(inserted_lines), len(inserted_lines[-1].encode())]
    # With no suggestion visible, <Tab> is an ordinary tab.
    assert obs["after_plain_tab"] == prefix + text + "\t" + suffix


@pytest.mark.timeout(600)
def test_typing_on_cancels_and_leaves_no_stale_ghost_text(session):
    obs = scenario(session, "cancel_on_type")
    assert obs["after_typing"] == obs["before"].replace("return \n", "return x\n", 1)
    assert obs["ghost_right_after_typing"] == ""
    assert obs["ghost_after_request_ended"] == ""
    assert obs["visible_after_request_ended"] is False
    # The server saw the cancellation: the first request was stopped, not answered.
    before, after = obs["stats_before"], obs["stats"]
    assert after["cancelled"] == before["cancelled"] + 1, (before, after)
    assert after["completed"] == before["completed"], (before, after)
    # <C-]> dismisses a visible suggestion without touching the buffer.
    assert obs["ghost_before_dismiss"]
    assert obs["ghost_after_dismiss"] == ""
    assert obs["buffer_after_dismiss"] == obs["after_typing"]


@pytest.mark.timeout(600)
def test_answer_for_an_older_version_is_dropped(session):
    # Neovim holds its didChange back (see `session`), so the server answers for the old text.
    obs = scenario(session, "stale_answer")
    assert obs["sent"] is True
    assert obs["version_now"] > obs["version_sent"]
    # The server did send a result for the old version (it had not heard of the edit yet) ...
    before, after = obs["stats_before"], obs["stats"]
    assert after["completed"] == before["completed"] + 1, (before, after)
    # ... and the plug-in dropped it: nothing drawn.
    assert obs["ghost"] == ""
    assert obs["visible"] is False


@pytest.mark.timeout(600)
def test_auto_trigger_shows_a_suggestion_for_the_current_text(session):
    obs = scenario(session, "auto_trigger")
    assert "return a \n" in obs["buffer"]
    assert obs["ghost"]
    assert obs["shown_version"] == obs["version_now"]


@pytest.mark.timeout(600)
def test_rewrite_command_replaces_the_visual_selection(session):
    obs = scenario(session, "rewrite")
    assert obs["pending_after_command"] is True  # :DgEditRewrite sent dg-edit.rewrite
    text = obs["server_final_text"]
    assert text is not None, "the server reported no final rewrite text"
    # The server's rewrite replaced exactly the selected line; its neighbours are kept as they were.
    assert obs["after"] == "import os\n" + text + "\nprint(values)"
    assert obs["stats"]["errors"] == obs["stats_before"]["errors"]


def _apply(text: str, edit: dict, encoding: str) -> str:
    """Apply an LSP edit to `text` (lines joined by \n) in the client's position encoding."""
    lines = text.split("\n")

    def offset(p: dict) -> int:
        line = lines[p["line"]]
        unit = {"utf-8": "utf-8", "utf-16": "utf-16-le", "utf-32": "utf-32-le"}[encoding]
        width = {"utf-8": 1, "utf-16": 2, "utf-32": 4}[encoding]
        col = len(line.encode(unit)[: p["character"] * width].decode(unit))
        return sum(len(x) + 1 for x in lines[: p["line"]]) + col

    return text[: offset(edit["range"]["start"])] + edit["text"] + text[offset(edit["range"]["end"]):]


@pytest.mark.timeout(600)
def test_next_edit_is_shown_after_a_rename_and_tab_jumps_then_accepts(session):
    obs = scenario(session, "next_edit")
    edit = obs["shown_edit"]
    # What is drawn is the server's first edit for the version on screen, and the buffer is untouched.
    server = obs["server_edit"][0]  # asked again: the same edit (its command names the other request)
    assert (edit["range"], edit["text"], edit["textDocument"]) == (server["range"], server["text"], server["textDocument"])
    assert obs["shown_version"] == obs["version_now"] == edit["textDocument"]["version"]
    assert obs["buffer_while_shown"] == obs["before"]
    assert obs["before"].splitlines()[1] == "    total = 0"
    # The replaced range is highlighted and the new text drawn beside it (after the range's end).
    marks = obs["marks"]
    drawn = [m for m in marks if m.get("text") is not None]
    assert len(drawn) == 1 and drawn[0]["text_hl"] == "DgEditNextEditNew"
    assert drawn[0]["text"] == (edit["text"] or " ")
    start, end = edit["range"]["start"], edit["range"]["end"]
    highlighted = [m for m in marks if m.get("hl") == "DgEditNextEditOld"]
    if start != end:
        assert len(highlighted) == 1 and highlighted[0]["row"] == start["line"] and highlighted[0]["end_row"] == end["line"]
    else:
        assert highlighted == []
    # <Tab> off the suggestion jumps to its start; <Tab> on it applies exactly the edit, in one undo step.
    assert obs["cursor_before_jump"][0] != obs["cursor_after_jump"][0]
    assert obs["cursor_after_jump"][0] == start["line"] + 1 and obs["visible_after_jump"] is True
    assert obs["after_accept"] == _apply(obs["before"], edit, obs["offset_encoding"])
    assert obs["marks_after_accept"] == []
    assert obs["after_undo"] == obs["before"]
    # Accepting ran the edit's command: the server counted it.
    assert obs["stats_after_accept"]["accepted"] == obs["stats_before"]["accepted"] + 1


@pytest.mark.timeout(600)
def test_next_edit_key_asks_escape_dismisses_and_stale_answers_are_dropped(session):
    obs = scenario(session, "next_edit_dismiss")
    assert obs["visible_before_dismiss"] is True
    assert obs["marks_after_dismiss"] == [] and obs["buffer_after_dismiss"] == obs["before"]
    assert obs["sent"] is True
    assert obs["visible_after_stale"] is False and obs["marks_after_stale"] == []


@pytest.mark.timeout(60)
def test_missing_server_is_reported_at_setup(nvim, tmp_path):
    env = server_env()
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    proc = subprocess.run(
        [nvim, "--headless", "--clean", "--cmd", f"set rtp^={PLUGIN}",
         "-c", 'lua require("dg_edit").setup({ cmd = { "no-such-dg-edit", "lsp" } })', "-c", "qall!"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert 'server not found: "no-such-dg-edit" is not executable' in proc.stdout + proc.stderr
