"""Hypothesis against one long-lived `dg-edit infill --json` process (the real console script, the test
model): request lines of random bytes, random JSON and request-shaped objects with wrong types,
huge numbers and broken Unicode. Invariants: every non-blank line gets exactly one reply line, in
order, that is a JSON object carrying the request's id and either `text` or `error`; the process
never dies; a valid request at the end is answered.

The process runs with a strict UTF-8 stdin/stdout (PYTHONIOENCODING=utf-8:strict), as on a desktop
with an ordinary UTF-8 locale: the reader must cope with bytes that are not UTF-8 by itself.
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dg_edit.serve_process import dg_edit_command
from fuzz_support import HYPOTHESIS, examples

pytestmark = pytest.mark.timeout(600)


class JsonLines:
    """`dg-edit infill --json` with a pipe in and out; one reply line per request line."""

    def __init__(self, model_dir, config, log_path):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8:strict"}
        self.proc = subprocess.Popen([*dg_edit_command(), "infill", "--json", "--model", str(model_dir),
                                      "--config", str(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env)
        self.buffer = b""

    def ask(self, line: bytes, timeout: float = 120) -> dict:
        assert b"\n" not in line
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def read(self, timeout: float) -> dict:
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            assert ready, f"no reply within {timeout} s (a hang)"
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            assert chunk, f"dg-edit infill --json exited ({self.proc.poll()}):\n{self.stderr()}"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        reply = json.loads(line.decode("utf-8"))  # replies are UTF-8 JSON, always
        assert isinstance(reply, dict), reply
        return reply

    def stderr(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def close(self) -> int:
        self.proc.stdin.close()
        code = self.proc.wait(60)
        self.log.close()
        return code


@pytest.fixture(scope="module")
def cli(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-cli")
    config = folder / "settings.json"
    config.write_text(json.dumps({"max_new_tokens": 8, "max_denoising_steps": 4}))
    proc = JsonLines(model_dir, config, folder / "stderr.log")
    yield proc
    assert proc.close() == 0, proc.stderr()
    assert "Traceback" not in proc.stderr(), proc.stderr()


def check_reply(line: bytes, reply: dict) -> None:
    try:
        request = json.loads(line.decode("utf-8", "surrogateescape"))
    except ValueError:
        request = None
    assert ("text" in reply) != ("error" in reply), reply
    if "error" in reply:
        assert isinstance(reply["error"], str) and reply["error"], reply
    else:
        assert isinstance(reply["text"], str) and reply["steps"] >= 0, reply
        assert isinstance(request, dict) and isinstance(request.get("prefix"), str), (line, reply)
    if isinstance(request, dict):
        assert reply["id"] == request.get("id"), (line, reply)
    else:
        assert reply["id"] is None, (line, reply)


def send(cli: JsonLines, line: bytes) -> None:
    if not line.decode("utf-8", "surrogateescape").strip():
        return  # blank lines are skipped, as documented
    check_reply(line, cli.ask(line))


# ---------------------------------------------------------------------------------------------- strategies
any_text = st.one_of(st.text(max_size=30), st.sampled_from(["", "\ud800", "x\udcff", "e\u0301", "😀", "\x00",
                                                            "\u2028", "def f():\n    return "]))
small_or_bad_int = st.one_of(st.integers(-5, 8), st.sampled_from([0, -1, -2**63, -10**30]),
                             st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(), any_text)
seeds = st.one_of(st.integers(-10, 10), st.sampled_from([2**63, 2**64, -2**63 - 1, 10**30]), st.floats(0, 1),
                  any_text)
ids = st.one_of(st.none(), st.integers(), any_text, st.lists(st.integers(), max_size=2),
                st.floats(allow_nan=False, allow_infinity=False))


@st.composite
def request_lines(draw):
    request = {}
    for name, values in (("id", ids), ("prefix", any_text | st.integers()), ("suffix", any_text | st.none()),
                         ("max_new_tokens", small_or_bad_int), ("seed", seeds), ("extra", any_text)):
        if draw(st.booleans()) or (name == "prefix" and draw(st.booleans())):
            request[name] = draw(values)
    return json.dumps(request, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------------------------------------- tests
@settings(max_examples=examples(40), **HYPOTHESIS)
@given(st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")))
def test_random_byte_lines(cli, fuzz_count, line):
    fuzz_count()
    send(cli, line)


@settings(max_examples=examples(30), **HYPOTHESIS)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8))
def test_random_json_lines(cli, fuzz_count, value):
    fuzz_count()
    send(cli, json.dumps(value).encode())


@settings(max_examples=examples(60), **HYPOTHESIS)
@given(request_lines())
def test_request_shaped_lines(cli, fuzz_count, line):
    fuzz_count()
    send(cli, line)


def test_a_valid_request_is_still_answered(cli):
    reply = cli.ask(json.dumps({"id": "last", "prefix": "def add(a, b):\n    return ", "suffix": "\n",
                                "seed": 1}).encode())
    assert reply["id"] == "last" and isinstance(reply["text"], str) and "error" not in reply, reply
    assert math.isfinite(reply["ms"])
