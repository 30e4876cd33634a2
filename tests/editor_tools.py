"""Where the editor end-to-end tests find code-server, node 24, Neovim and the .vsix.

`editors/install-test-deps.sh` installs them and writes `$DG_EDIT_TEST_PREFIX/paths.json`
(default prefix /opt/dg-edit-test). Without it the editor tests skip with the command to run,
except under CI (CI=true), where a missing install is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL = "bash editors/install-test-deps.sh"


def editor_tools() -> dict:
    prefix = Path(os.environ.get("DG_EDIT_TEST_PREFIX", "/opt/dg-edit-test"))
    paths_file = prefix / "paths.json"
    problem = None
    if not paths_file.exists():
        problem = f"{paths_file} not found"
    else:
        tools = json.loads(paths_file.read_text())
        # The .vsix this checkout built (install-test-deps.sh builds it in editors/vscode): the tests
        # test this checkout's extension, even where paths.json names another checkout's.
        own = REPO / "editors" / "vscode" / "dg-edit.vsix"
        if own.exists():
            tools["vsix"] = str(own)
        for key in ("node", "code_server", "nvim", "vsix"):
            if not Path(tools[key]).exists():
                problem = f"{key} missing: {tools[key]}"
                break
        else:
            return tools
    message = f"editor test dependencies not installed ({problem}); run: {INSTALL}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def lsp_command(model_dir: Path) -> list[str]:
    """argv that starts the real language server with the test model, as an editor would."""
    exe = shutil.which("dg-edit")
    base = [exe] if exe else [sys.executable, "-m", "dg_edit.cli"]
    return [*base, "lsp", "--model", str(model_dir)]


def server_env() -> dict[str, str]:
    """The environment editors start the server in: one torch thread (see the preamble)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def read_tee_log(path: Path, sender: str = "server") -> list[dict]:
    """The messages `tee_main` recorded from `sender` ("server" or "client"), oldest first."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["message"] for r in records if r["from"] == sender]


def tee_main(argv: list[str]) -> int:
    """`python tests/editor_tools.py LOG -- CMD...`: run CMD (a language server on stdio) and record
    every message both ways in LOG (one JSON object per line: {"from": "client"|"server",
    "message": ...}), so an end-to-end test can tell which text really came from the server.
    Bytes pass through unchanged."""
    import subprocess
    import threading
    import time

    log_path, cmd = argv[0], argv[argv.index("--") + 1:]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    log = open(log_path, "a", encoding="utf-8")
    lock = threading.Lock()

    def pump(src, dst, sender: str) -> None:
        buf = b""
        while chunk := src.read1(65536):
            dst.write(chunk)
            dst.flush()
            buf += chunk
            while (end := buf.find(b"\r\n\r\n")) >= 0:  # LSP framing: headers, blank line, body
                headers = dict(line.split(b": ", 1) for line in buf[:end].split(b"\r\n") if b": " in line)
                size = int(headers[b"Content-Length"])
                if len(buf) < end + 4 + size:
                    break
                body, buf = buf[end + 4:end + 4 + size], buf[end + 4 + size:]
                with lock:
                    log.write(json.dumps({"from": sender, "t": round(time.time(), 3), "message": json.loads(body)}) + "\n")
                    log.flush()
        if sender == "client":
            dst.close()

    threading.Thread(target=pump, args=(sys.stdin.buffer, child.stdin, "client"), daemon=True).start()
    pump(child.stdout, sys.stdout.buffer, "server")
    code = child.wait()
    log.close()
    # os._exit: the client pump may sit in a blocking read that would stall interpreter exit.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(tee_main(sys.argv[1:]))
