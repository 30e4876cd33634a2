"""End to end: llama.vim, llama.cpp's own Neovim/Vim plug-in, talking to `dg-edit serve`'s /infill.

llama.vim is the one editor plug-in for these APIs that a registry carries: llama.cpp's sources
ship it (examples/llama.vim), and PyPI's llama-cpp-python sdist vendors those sources;
editors/install-test-deps.sh takes the file from there. It runs unmodified in a real headless
Neovim 0.11 (tests/llama_vim_e2e.lua types the keys), with curl, against the real service and the
test model. A recording pass-through between the two keeps every request and answer, so the test can
check what llama.vim sent (its ring of chunks as input_extra) and that what it drew is what the
service answered. The model's text is never judged.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from dg_edit.serve_process import ServeProcess
from editor_tools import INSTALL, REPO, editor_tools

SCRIPT = REPO / "tests" / "llama_vim_e2e.lua"
HARNESS = REPO / "editors" / "nvim" / "tests" / "harness.lua"  # coroutine helpers, shared with the plug-in's e2e
OTHER = "RATE = 0.25\nLIMIT = 100\n\n\ndef clamp(value):\n    return max(0, min(value, LIMIT))\n"
MAIN = "import math\n\n\ndef area(radius):\n    return\n\n\nprint(area(2.0))\n"
ROW = 5  # 1-based: "    return", the cursor goes to its end


@pytest.fixture(scope="module")
def llama_vim() -> tuple[str, Path]:
    tools = editor_tools()
    plugin = Path(tools.get("llama_vim", "")) / "autoload" / "llama.vim"
    if not plugin.is_file():
        message = f"llama.vim not installed ({plugin}); run: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return tools["nvim"], plugin.parent.parent


class Recorder:
    """A pass-through HTTP server in front of the service that keeps (path, request, status, answer)."""

    def __init__(self, upstream: str):
        self.exchanges: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                answer = httpx.post(upstream + self.path, content=body, headers=headers, timeout=120)
                recorder.exchanges.append({"path": self.path, "request": json.loads(body),
                                           "status": answer.status_code, "answer": answer.json()})
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers["content-type"])
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "Recorder":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(600)
def test_llama_vim_completes_through_infill_with_its_ring_of_chunks(llama_vim, model_dir, tmp_path):
    nvim, plugin = llama_vim
    other, main = tmp_path / "constants.py", tmp_path / "main.py"
    other.write_text(OTHER)
    main.write_text(MAIN)
    out = tmp_path / "observed.json"
    with ServeProcess(["--model", str(model_dir)]) as service, Recorder(service.url) as recorder:
        spec = {"plugin": str(plugin), "harness": str(HARNESS), "endpoint": recorder.url + "/infill", "other": str(other),
                "main": str(main), "row": ROW, "out": str(out)}
        env = {**os.environ, "LLAMA_VIM_E2E": json.dumps(spec), "XDG_STATE_HOME": str(tmp_path / "state")}
        run = subprocess.run([nvim, "--headless", "--clean", "-c", f"luafile {SCRIPT}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.exists(), f"nvim wrote nothing (exit {run.returncode}):\n{run.stdout}\n{run.stderr}"
        obs = json.loads(out.read_text())
        assert "error" not in obs, f"{obs['error']}\n{obs.get('messages')}\n{service.log()[-3000:]}"
    assert "E" not in "".join(line[:1] for line in obs["messages"].splitlines()), obs["messages"]  # no Vim errors
    infills = [e for e in recorder.exchanges if e["path"] == "/infill"]
    assert infills and all(e["status"] == 200 for e in infills), [(e["status"], e["answer"]) for e in infills]
    # llama.vim's ring: chunks of the other file went to the service as input_extra.
    assert any(chunk["filename"].endswith("constants.py") and "LIMIT = 100" in chunk["text"]
               for e in infills for chunk in e["request"]["input_extra"]), [e["request"] for e in infills]
    # The completion request (the one with a prompt) and what llama.vim drew from its answer.
    fim = [e for e in infills if e["request"]["prompt"]][-1]
    assert fim["request"]["prompt"] == "    return" and fim["request"]["input_suffix"].startswith("\n")
    content = fim["answer"]["content"].rstrip("\n").split("\n")
    assert obs["ghost_first"] == content[0] and obs["ghost_rest"] == content[1:]
    assert obs["mode_while_shown"] == "i" and obs["buffer_while_shown"] == MAIN.rstrip("\n")
    # <Tab> inserted exactly that text at the cursor.
    lines = MAIN.rstrip("\n").split("\n")
    lines[ROW - 1:ROW] = ("    return" + "\n".join(content)).split("\n")
    assert obs["after"] == "\n".join(lines)
