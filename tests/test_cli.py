"""The `dg-edit` command line, run as a user runs it: a subprocess with real stdin/stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dg_edit.cli import split_at


def run(args: list[str], stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dg_edit.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_infill_json_lines_in_order_with_errors_inline(tiny_model_dir):
    lines = [
        json.dumps({"id": "a", "prefix": "def f(x):\n    return ", "suffix": "\n", "seed": 1}),
        "this is not json",
        json.dumps({"id": "c", "suffix": "no prefix"}),
        json.dumps({"id": "d", "prefix": "x = ", "max_new_tokens": 0}),
        json.dumps({"id": "e", "prefix": "x = ", "bogus": 1}),
        json.dumps([1, 2]),
        json.dumps({"id": 7, "prefix": "import os\n", "seed": 2, "max_new_tokens": 8}),
    ]
    proc = run(["infill", "--json", "--model", str(tiny_model_dir)], "\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(l) for l in proc.stdout.splitlines()]
    assert [o.get("id") for o in out] == ["a", None, "c", "d", "e", None, 7]
    assert set(out[0]) == {"id", "text", "steps", "tokens_per_forward", "ms"}
    assert "not JSON" in out[1]["error"]
    assert "prefix" in out[2]["error"]
    assert "max_new_tokens" in out[3]["error"]
    assert "bogus" in out[4]["error"]
    assert "object" in out[5]["error"]
    assert out[6]["steps"] > 0
    assert "Traceback" not in proc.stderr


def test_infill_json_single_line_as_the_websocket_request_takes_it(tiny_model_dir):
    # The cursor sits on an empty line, so by default the answer may run over several lines.
    request = {"prefix": "import os\n", "suffix": "\nprint(os.sep)\n", "max_new_tokens": 24}
    lines = [json.dumps({**request, "id": f"s{seed}", "seed": seed, "single_line": True}) for seed in range(6)]
    lines += [json.dumps({**request, "id": f"b{seed}", "seed": seed, "single_line": False}) for seed in range(6)]
    lines += [json.dumps({**request, "id": "bad", "single_line": "yes"})]
    proc = run(["infill", "--json", "--model", str(tiny_model_dir)], "\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    out = {o["id"]: o for o in map(json.loads, proc.stdout.splitlines())}
    assert all("\n" not in out[f"s{seed}"]["text"] for seed in range(6))
    assert any("\n" in out[f"b{seed}"]["text"] for seed in range(6))  # so the flag above did something
    assert "single_line" in out["bad"]["error"]


def test_infill_json_is_deterministic_with_a_seed(tiny_model_dir):
    line = json.dumps({"prefix": "for i in range(", "suffix": "):\n    pass\n", "seed": 5}) + "\n"
    a = run(["infill", "--json", "--model", str(tiny_model_dir)], line * 2)
    texts = [json.loads(l)["text"] for l in a.stdout.splitlines()]
    assert texts[0] == texts[1]


def test_infill_at_cursor_in_file(tiny_model_dir, tmp_path):
    src = tmp_path / "s.py"
    src.write_text("def add(a, b):\n    return \n\nprint(add(1, 2))\n")
    proc = run(["infill", str(src), "--at", "2:12", "--model", str(tiny_model_dir), "--seed", "1"])
    assert proc.returncode == 0, proc.stderr
    assert "steps" in proc.stderr
    assert src.read_text() == "def add(a, b):\n    return \n\nprint(add(1, 2))\n"  # the file is never written


@pytest.mark.parametrize(
    "args,message",
    [
        (["infill", "{f}", "--at", "99:1"], "past the end of the file"),
        (["infill", "{f}", "--at", "1:99"], "past the end of line"),
        (["infill", "{f}", "--at", "x"], "LINE:COL"),
        (["infill", "{d}", "--at", "1:1"], "directory"),
        (["infill", "{f}.missing", "--at", "1:1"], "not found"),
        (["infill", "{b}", "--at", "1:1"], "not UTF-8"),
        (["info", "--model", "{d}/nope"], "not found"),
        (["info", "--model", "{d}"], "missing config.json"),
        (["info", "--config", "{f}"], "not valid JSON"),
    ],
)
def test_errors_are_one_line_exit_2(args, message, tmp_path, tiny_model_dir):
    f = tmp_path / "a.py"
    f.write_text("x = 1\n")
    b = tmp_path / "b.bin"
    b.write_bytes(b"\xff\xfe\x00binary")
    args = [a.format(f=f, d=tmp_path, b=b) for a in args]
    if "--model" not in args and args[0] == "infill":
        args += ["--model", str(tiny_model_dir)]
    proc = run(args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_settings_key_is_rejected(tmp_path, tiny_model_dir):
    cfg = tmp_path / "settings.json"
    cfg.write_text(json.dumps({"max_new_tokns": 3}))
    proc = run(["info", "--model", str(tiny_model_dir), "--config", str(cfg)])
    assert proc.returncode == 2 and "max_new_tokns" in proc.stderr


def test_info_json(tiny_model_dir):
    proc = run(["info", "--json", "--model", str(tiny_model_dir)])
    info = json.loads(proc.stdout)
    assert info["canvas_length"] == 16 and info["parameters"] > 0 and info["device"] == "cpu"


def test_split_at_counts_characters_not_bytes():
    text = "é = 1\nπ = 'ü'\n"
    prefix, suffix = split_at(text, 2, 6)
    assert prefix == "é = 1\nπ = '" and suffix == "ü'\n"
