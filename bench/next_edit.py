"""Next-edit latency, measured side by side in one run on the embedded model and real code.

(a) a prepared suggestion (`Engine.prepare_next_edit`, then the request)    target <= 50 ms
(b) a cold next-edit request, p50, over a single-line infill's at the cursor  target <= 2.0

Cases: the committed next-edit set (bench/next_edit_cases.jsonl, rich/textual sources), those that
expect an edit, every K-th. For each case, in turn and alternating which runs first: a single-line
infill at the cursor and a next-edit request at the cursor with the case's recent edits, both on a
fresh session ("cold": nothing of the document cached), then the same two after the document was
prefilled ("warm document": what an editor that has had the file open sees), then the next edit
prepared in the background and asked for.

    OMP_NUM_THREADS=1 python bench/next_edit.py [--every 10] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dg_edit import Engine
from dg_edit.config import Settings
from dg_edit.edits import TextEdit

CASES = Path(__file__).resolve().parent / "next_edit_cases.jsonl"


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    parser.add_argument("--cases", type=Path, default=CASES)
    parser.add_argument("--every", type=int, default=10, help="every K-th case expecting an edit")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Idle work only when asked for (prefill_now, prepare): the timed requests run alone.
    engine = Engine.load(args.model, settings=Settings(idle_prefill_ms=0))
    rows = [json.loads(line) for line in args.cases.read_text(encoding="utf-8").splitlines()]
    cases = [c for c in rows if c["expected"]][:: max(1, args.every)]
    print(f"{engine.name}: {len(cases)} cases from {args.cases.name}, {torch.get_num_threads()} thread(s), "
          f"window {engine.settings.next_edit_window_tokens} tokens, strength {engine.settings.next_edit_strength}")
    engine.infill("def f():\n    return ", "\n", single_line=True, seed=0)  # warm-up (first calls allocate)
    times: dict[str, list[float]] = {k: [] for k in ("infill_cold", "next_cold", "infill_warm", "next_warm",
                                                     "prepared")}
    steps = {"infill": [], "next": []}
    for i, case in enumerate(cases):
        text, cursor = case["text"], case["cursor"]
        history = [TextEdit.from_json(e) for e in case["edits"]]

        def infill(session: str) -> float:
            t0 = time.perf_counter()
            done = engine.infill(text[:cursor], text[cursor:], single_line=True, seed=0, session=session)
            steps["infill"].append(done.steps)
            return ms_since(t0)

        def next_edit(session: str) -> float:
            engine.forget(session)  # history and caches of an earlier round
            for edit in history:
                engine.record_edit(session, edit)
            t0 = time.perf_counter()
            done = engine.next_edit(text, cursor, session=session)
            steps["next"].append(done.steps)
            assert not done.prepared
            return ms_since(t0)

        order = ("infill", "next") if i % 2 == 0 else ("next", "infill")
        for kind in order:  # cold: fresh sessions
            session = f"{kind}-cold-{i}"
            times[f"{kind}_cold"].append(infill(session) if kind == "infill" else next_edit(session))
            engine.forget(session)
        for kind in order:  # warm document: prefilled as idle prefill leaves it
            session = f"{kind}-warm-{i}"
            engine.prefill_now(session, text)
            times[f"{kind}_warm"].append(infill(session) if kind == "infill" else next_edit(session))
        # (a) prepared: the editor went quiet after the edit; the suggestion was made meanwhile.
        session = f"next-warm-{i}"
        engine.prepare_next_edit(session, text, cursor)
        assert engine.wait_next_edit_prepared(300)
        t0 = time.perf_counter()
        done = engine.next_edit(text, cursor, session=session)
        times["prepared"].append(ms_since(t0))
        assert done.prepared, "the prepared answer was not used"
        for kind in ("infill", "next"):
            engine.forget(f"{kind}-warm-{i}")

    p50 = {k: statistics.median(v) for k, v in times.items()}
    worst = max(times["prepared"])
    print(f"(a) prepared next edit: p50 {p50['prepared']:.2f} ms, max {worst:.2f} ms   (target <= 50 ms)")
    print(f"(b) cold:           next edit p50 {p50['next_cold']:7.1f} ms   single-line infill p50 "
          f"{p50['infill_cold']:7.1f} ms   ratio = {p50['next_cold'] / p50['infill_cold']:.2f}   (target <= 2.0)")
    print(f"    warm document:  next edit p50 {p50['next_warm']:7.1f} ms   single-line infill p50 "
          f"{p50['infill_warm']:7.1f} ms   ratio = {p50['next_warm'] / p50['infill_warm']:.2f}")
    print(f"    denoising steps p50: next edit {statistics.median(steps['next']):.0f}, "
          f"single-line infill {statistics.median(steps['infill']):.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
