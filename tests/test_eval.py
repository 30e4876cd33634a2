"""The evaluation harness end to end on a tiny random model (the figures need not be good)."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from dg_edit.model import eval as ev
from dg_edit.model.arch import build_model
from dg_edit.model.train import export_model

PROBLEMS = [
    dict(task_id="T/0", entry_point="add", prompt="def add(a, b):\n", suffix="",
         canonical_solution="    return a + b\n",
         test="def check(f):\n    assert f(1, 2) == 3\n"),
    dict(task_id="T/1", entry_point="four", prompt="def four(x):\n    x = x + x\n", suffix="    return x\n",
         canonical_solution="    x = x + x\n",
         test="def check(f):\n    assert f(1) == 4\n"),
    dict(task_id="T/2", entry_point="f", prompt="def f():\n    return 1\n", suffix="",
         canonical_solution="    pass\n",
         test="def check(f):\n    pass\n"),
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    model = build_model("tiny", seed=0)
    export_model(model, d, dg_edit={"max_denoising_steps": 4})
    return d


@pytest.fixture()
def data_dir(tmp_path):
    with gzip.open(tmp_path / ev.SPLITS["single-line"], "wt", encoding="utf-8") as f:
        for p in PROBLEMS:
            f.write(json.dumps(p) + "\n")
    return tmp_path


def test_baselines():
    assert ev.previous_line("a = 1\nb = 2\n") == "b = 2"
    assert ev.previous_line("a = 1\n    b") == "a = 1"
    assert ev.previous_line("") == ""
    assert ev.baseline_completion("empty", "x\n", True) == ""
    assert ev.baseline_completion("prev-line", "x = 1\n", True) == "x = 1\n"


def test_run_program_passes_fails_and_times_out():
    assert ev.run_program("assert 1 + 1 == 2\n", 3.0)
    assert not ev.run_program("raise SystemExit(1)\n", 3.0)
    assert not ev.run_program("while True: pass\n", 0.5)


def test_humaneval_end_to_end(tiny_model_dir, data_dir, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    rc = ev.main(["humaneval-infilling", "--split", "single-line", "--limit", "3", "--model", str(tiny_model_dir),
                  "--data", str(data_dir), "--json", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    assert re.search(r"humaneval-infilling single-line: 3 problems", out)
    assert re.search(r"model\s+pass@1\s+[\d.]+% \(\d/3\)\s+median latency \d+ ms\s+tokens/forward [\d.]+", out)
    # the baselines are computed and printed beside the model: T/2 passes with any middle,
    # T/1 passes with "prev-line" (x = x + x again), nothing else passes with an empty middle
    assert re.search(r"empty\s+pass@1\s+33\.3% \(1/3\)", out), out
    assert re.search(r"prev-line\s+pass@1\s+66\.7% \(2/3\)", out), out
    rec = json.loads(out_json.read_text())
    assert rec["summary"]["n"] == 3 and len(rec["records"]) == 3
    assert set(rec["summary"]["pass_at_1"]) == {"model", "empty", "prev-line"}


def test_exact_end_to_end(tiny_model_dir, tmp_path, capsys):
    tasks = tmp_path / "t.jsonl"
    rows = [dict(prefix="x = 1\n", suffix="z = 3\n", middle="x = 1\n"),
            dict(prefix="def f():\n", suffix="", middle="    return 0\n")]
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = ev.main(["exact", str(tasks), "--model", str(tiny_model_dir)])
    assert rc == 0
    out = capsys.readouterr().out
    assert re.search(r"model\s+exact\s+[\d.]+% \(\d/2\)\s+edit-sim [\d.]+\s+median latency \d+ ms", out), out
    assert re.search(r"prev-line\s+exact\s+50\.0% \(1/2\)\s+edit-sim [\d.]+", out), out
    assert re.search(r"empty\s+exact\s+0\.0% \(0/2\)", out), out
    assert re.search(r"prev-line\s+exact\s+50\.0% \(1/2\)", out), out


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    rc = ev.main(["humaneval-infilling", "--data", str(tmp_path / "nope"), "--limit", "1"])
    assert rc == 2
    assert "not found" in capsys.readouterr().err


def test_next_edit_end_to_end(tiny_model_dir, tmp_path, capsys):
    # One case expecting the rename's next use (which repeating the last edit gets right), one expecting nothing.
    text = "def f(n):\n    total = n\n    return count\n"
    at = text.index("total")
    use = text.index("count")
    rows = [dict(id="p", kind="rename_local", text=text, cursor=at + 5,
                 edits=[dict(start=at, end=at + 5, text="total", old_text="count")],
                 expected=[dict(start=use, end=use + 5, text="total", old_text="count")]),
            dict(id="n", kind="rename_local_done", text=text.replace("count", "total"), cursor=use + 5,
                 edits=[dict(start=use, end=use + 5, text="total", old_text="count")], expected=[])]
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_json = tmp_path / "out.json"
    assert ev.main(["next-edit", str(cases), "--model", str(tiny_model_dir), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"model\s+exact\s+[\d.]+% \(\d/2\).*location\s+[\d.]+% \(\d/1\).*median \d+ ms", out), out
    assert re.search(r"no-edit\s+exact\s+50\.0% \(1/2\)\s+exact \(edit expected\)\s+0\.0% \(0/1\).*"
                     r"rightly nothing 100\.0% \(1/1\)", out), out
    assert re.search(r"repeat-last\s+exact\s+100\.0% \(2/2\)\s+exact \(edit expected\)\s+100\.0% \(1/1\)\s+"
                     r"location 100\.0% \(1/1\)\s+rightly nothing 100\.0% \(1/1\)", out), out
    summary = json.loads(out_json.read_text())["summary"]
    assert summary["n"] == 2 and summary["repeat-last"]["exact"] == 1.0 and summary["no-edit"]["location"] == 0.0


def test_the_committed_next_edit_set_replays_and_is_what_the_script_makes(tmp_path):
    import importlib.metadata
    from pathlib import Path

    from dg_edit.model import corpus, next_edit_data

    committed = Path(__file__).resolve().parent.parent / "bench" / "next_edit_cases.jsonl"
    cases = [json.loads(line) for line in committed.read_text(encoding="utf-8").splitlines()]
    assert 200 <= len(cases) <= 600
    kinds = {c["kind"] for c in cases}
    assert kinds == {"rename_local", "add_param", "repeat_pattern", *(f"{k}_done" for k in
                                                                      ("rename_local", "add_param", "repeat_pattern"))}
    stdlib = {f.rel for f in corpus.iter_files()}
    for case in cases:
        next_edit_data.check(case)  # the recorded edits undo and replay; the expected ones index the text
        package, path = case["source"].split(":")[0:2]
        assert package.split("==")[0] in next_edit_data.PACKAGES and path not in stdlib  # not training data
        assert bool(case["expected"]) != case["kind"].endswith("_done")
    versions = {c["source"].split(":")[0] for c in cases}
    if versions == {f"{p}=={importlib.metadata.version(p)}" for p in next_edit_data.PACKAGES}:
        out = tmp_path / "again.jsonl"
        assert next_edit_data.main(["--out", str(out)]) == 0
        assert out.read_text(encoding="utf-8") == committed.read_text(encoding="utf-8")
