"""`dg-edit tui` in a real terminal (tmux), driven with keystrokes and checked on the screen, as a
person would use it: open a file, infill, watch the canvas, accept, save, quit."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dg_edit.serve_process import dg_edit_command

TMUX = shutil.which("tmux")
pytestmark = [
    pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)"),
    pytest.mark.timeout(240),
]

SOURCE = 'import os\n\n\ndef add(a, b):\n    return a + b\n\n\ndef main():\n    \n'


class Terminal:
    """One tmux server of our own (its own socket), one 120x35 window running a command."""

    def __init__(self, socket: Path):
        self.socket = str(socket)

    def tmux(self, *args: str) -> str:
        out = subprocess.run([TMUX, "-S", self.socket, *args], check=True, capture_output=True, text=True, timeout=30)
        return out.stdout

    def start(self, command: str) -> None:
        self.tmux("new-session", "-d", "-s", "tui", "-x", "120", "-y", "35", command)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "tui")

    def keys(self, *keys: str) -> None:
        for key in keys:  # one at a time: the app parses escape sequences with a short timeout
            self.tmux("send-keys", "-t", "tui", key)
            time.sleep(0.15)

    def wait_for(self, *texts: str, timeout: float = 120.0, changed_from: str | None = None) -> str:
        """The screen once it shows one of `texts` (and differs from `changed_from`, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if any(t in screen for t in texts) and screen != changed_from:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"none of {texts} appeared on screen:\n{screen}")
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run([TMUX, "-S", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def terminal(tmp_path):
    term = Terminal(tmp_path / "tmux.sock")
    yield term
    term.close()


def tui_command(path: Path, model_dir: Path) -> str:
    cmd = [*dg_edit_command(), "tui", str(path), "--model", str(model_dir)]
    # the shell stays after the app exits so the exit code can be read off the screen
    # COLUMNS/LINES from the test runner would override the pane's real size
    return (f"env -u COLUMNS -u LINES OMP_NUM_THREADS=1 TERM=xterm-256color {shlex.join(cmd)}; "
            f"echo \"EXITED $?\"; sleep 600")


def test_infill_accept_save_quit_in_a_real_terminal(tmp_path, terminal, model_dir):
    path = tmp_path / "demo.py"
    path.write_text(SOURCE)
    terminal.start(tui_command(path, model_dir))
    screen = terminal.wait_for("ready", "no model")
    assert "ready" in screen, screen
    assert "def add(a, b):" in screen and " 5 " in screen  # the file, with line numbers
    assert "Infill" in screen and "Save" in screen  # the footer tells what the keys do

    terminal.keys("F3")  # the canvas panel
    assert "canvas: no request yet" in terminal.wait_for("canvas: no request yet")
    terminal.keys(*["Down"] * 8, "End")  # the empty body of main()
    for attempt in range(6):  # an empty middle is a legitimate answer ("proposed nothing"): ask again
        before = terminal.screen()
        terminal.keys(("C-Space", "F2")[attempt % 2])  # both keys infill
        # a new request always changes the screen (its timings at least)
        screen = terminal.wait_for("infill: review", "proposed nothing", changed_from=before)
        if "infill: review" in screen:
            break
        assert path.read_text() == SOURCE
    assert "infill: review" in screen, screen
    assert "steps" in screen and "tok/fwd" in screen and " ms" in screen
    assert "canvas  step" in screen
    terminal.keys("Tab")
    terminal.wait_for("infill accepted")
    terminal.wait_for("[+]")  # unsaved
    assert "tab Accept" not in terminal.wait_for("^space Infill")
    terminal.keys("C-s")
    terminal.wait_for("saved ")
    saved = path.read_text()
    assert saved != SOURCE
    prefix = SOURCE[: SOURCE.index("    \n") + 4]
    assert saved.startswith(prefix) and saved.endswith("\n")

    # an unsaved edit: quitting asks, and escape goes back to the editor
    terminal.keys("x")
    terminal.keys("C-q")
    terminal.wait_for("There are unsaved changes.")
    terminal.keys("Escape")
    time.sleep(0.5)
    assert "EXITED" not in terminal.screen()
    terminal.keys("BSpace", "C-q")  # the buffer equals the file again: quits at once
    screen = terminal.wait_for("EXITED")
    assert "EXITED 0" in screen
    assert "Traceback" not in screen


def test_bad_file_gets_a_message_not_a_traceback(tmp_path, terminal, model_dir):
    path = tmp_path / "latin1.py"
    path.write_bytes(b"name = 'caf\xe9'\n")
    terminal.start(tui_command(path, model_dir))
    screen = terminal.wait_for("not UTF-8")
    assert "Cannot open this file" in screen
    terminal.keys("Enter")
    screen = terminal.wait_for("EXITED")
    assert "EXITED 2" in screen and "Traceback" not in screen
    assert path.read_bytes() == b"name = 'caf\xe9'\n"


def test_next_edit_diff_and_tab_in_a_real_terminal(tmp_path, terminal, model_dir):
    """Rename a variable key by key; f4 shows the model's next edit as a -/+ diff under the editor,
    tab applies it, and the saved file has the + lines the screen showed."""
    source = "def total_price(items):\n    count = 0\n    for item in items:\n        count += item.price\n    return count\n"
    path = tmp_path / "prices.py"
    path.write_text(source)
    terminal.start(tui_command(path, model_dir))
    assert "ready" in terminal.wait_for("ready", "no model")
    terminal.keys("Down", "End", *["Left"] * 4, *["BSpace"] * 5, *"total")
    renamed = source.replace("    count = 0", "    total = 0", 1)
    terminal.wait_for("total = 0")
    terminal.keys("F4")
    screen = terminal.wait_for("next edit at line", "suggests nothing", "next edit failed")
    assert "next edit at line" in screen, screen
    assert "tab applies" in screen and "escape dismisses" in screen
    shown = [line.strip() for line in screen.splitlines()]
    added = [line[2:] for line in shown if line.startswith("+ ")]
    removed = [line[2:] for line in shown if line.startswith("- ")]
    assert added and removed, screen
    assert path.read_text() == source  # nothing written, and the buffer not changed by the suggestion
    terminal.keys("Tab")
    terminal.wait_for("next edit applied")
    assert "next edit at line" not in terminal.screen()
    terminal.keys("C-s")
    terminal.wait_for("saved ")
    saved = path.read_text()
    assert saved != renamed
    saved_lines = [line.strip() for line in saved.splitlines()]
    assert all(line.strip() in saved_lines for line in added if line.strip()), (added, saved)
    terminal.keys("C-q")
    screen = terminal.wait_for("EXITED")
    assert "EXITED 0" in screen and "Traceback" not in screen
