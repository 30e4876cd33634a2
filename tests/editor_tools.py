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
