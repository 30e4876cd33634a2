"""`dg-edit eval next-edit FILE.jsonl`: score next-edit suggestions (cases from `next_edit_data.py`).

For each case the model is asked `Engine.next_edit(text, cursor, edits=recent edits)` (no session:
every case is cold), and two baselines answer beside it:

- `no-edit`: never suggests anything;
- `repeat-last`: the last edit's change (old text -> new text) at the old text's next whole-word
  occurrence after the cursor (`dg_edit.next_edit.repeat_last_edit`).

Figures:

- exact: the document after the suggested edits equals the document after the expected ones (for
  a case expecting nothing, exact = no suggestion); over all cases and over those expecting an edit;
- location: of the cases expecting an edit, how often the first line the suggestion changes is the
  first line the expected edits change;
- rightly nothing: of the cases expecting nothing, how often nothing is suggested;
- in window: of the cases expecting an edit, how often every expected edit lies inside the window the
  engine rewrote (what the model could have got right at all).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dg_edit.edits import TextEdit, apply_edits
from dg_edit.next_edit import repeat_last_edit

METHODS = ("model", "no-edit", "repeat-last")


def first_line(text: str, edits: Sequence[TextEdit]) -> int | None:
    """The line number (0-based) of the first character the edits change; None without edits."""
    if not edits:
        return None
    return text.count("\n", 0, min(e.start for e in edits))


@dataclass
class Tally:
    n: int = 0
    exact: int = 0
    positives: int = 0
    exact_positive: int = 0
    located: int = 0
    negatives: int = 0
    rightly_nothing: int = 0
    by_kind: dict = field(default_factory=dict)  # kind -> [exact, n]

    def add(self, kind: str, text: str, expected: Sequence[TextEdit], predicted: Sequence[TextEdit]) -> bool:
        ok = apply_edits(text, predicted) == apply_edits(text, expected)
        self.n += 1
        self.exact += ok
        per = self.by_kind.setdefault(kind, [0, 0])
        per[0] += ok
        per[1] += 1
        if expected:
            self.positives += 1
            self.exact_positive += ok
            self.located += first_line(text, predicted) == first_line(text, expected)
        else:
            self.negatives += 1
            self.rightly_nothing += not predicted
        return ok

    def summary(self) -> dict:
        def rate(k, n):
            return k / n if n else 0.0

        return {"n": self.n, "exact": rate(self.exact, self.n),
                "exact_positive": rate(self.exact_positive, self.positives),
                "location": rate(self.located, self.positives),
                "rightly_nothing": rate(self.rightly_nothing, self.negatives),
                "by_kind": {k: rate(a, b) for k, (a, b) in sorted(self.by_kind.items())}}


def read_cases(path: Path) -> list[dict]:
    cases = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    for i, c in enumerate(cases):
        missing = {"text", "cursor", "edits", "expected"} - set(c)
        if missing:
            raise ValueError(f"{path}: case {i + 1} lacks {', '.join(sorted(missing))}")
    return cases


def run(args, engine, progress) -> int:
    from .eval import pct

    cases = read_cases(args.file)[:: max(1, args.every)]
    if args.limit:
        cases = cases[: args.limit]
    sampling = json.loads(args.sampling) if args.sampling else {}
    tallies = {m: Tally() for m in METHODS}
    in_window = 0
    latency: list[float] = []
    records = []
    prog = progress(len(cases), "next-edit")
    for c in cases:
        text, cursor, kind = c["text"], c["cursor"], c.get("kind", "-")
        history = [TextEdit.from_json(e) for e in c["edits"]]
        expected = [TextEdit.from_json(e) for e in c["expected"]]
        done = engine.next_edit(text, cursor, edits=history, seed=args.seed, sampling=sampling or None)
        latency.append(done.ms)
        answers = {"model": list(done.edits), "no-edit": [], "repeat-last": list(repeat_last_edit(text, cursor, history))}
        oks = {m: tallies[m].add(kind, text, expected, answers[m]) for m in METHODS}
        start, end = done.window or (0, 0)
        inside = bool(expected) and all(start <= e.start and e.end <= end for e in expected)
        in_window += inside
        records.append({"id": c.get("id"), "kind": kind, "ok": oks, "in_window": inside, "ms": round(done.ms, 1),
                        "steps": done.steps, "suggested": [e.to_json() for e in done.edits]})
        prog.update(ms=f"{done.ms:.0f}", exact=tallies["model"].exact)
    prog.close()
    n = len(cases)
    summaries = {m: tallies[m].summary() for m in METHODS}
    t = tallies["model"]
    print(f"next-edit: {n} cases from {args.file} (model {engine.name}); {t.positives} expect an edit "
          f"({pct(in_window, t.positives)} inside the window), {t.negatives} expect none")
    for m in METHODS:
        s = tallies[m]
        line = (f"  {m:<12} exact {pct(s.exact, s.n)}   exact (edit expected) {pct(s.exact_positive, s.positives)}   "
                f"location {pct(s.located, s.positives)}   rightly nothing {pct(s.rightly_nothing, s.negatives)}")
        if m == "model" and latency:
            line += f"   median {statistics.median(latency):.0f} ms"
        print(line)
    kinds = sorted(summaries["model"]["by_kind"])
    print("  exact by kind: " + "; ".join(
        f"{k} " + "/".join(f"{summaries[m]['by_kind'][k] * 100:.0f}%" for m in METHODS) for k in kinds)
        + "  (model/no-edit/repeat-last)")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": {"task": "next-edit", "file": str(args.file), "n": n,
                                                           "model": engine.name, "in_window": in_window,
                                                           "median_ms": statistics.median(latency) if latency else None,
                                                           **summaries}, "records": records}, indent=1) + "\n")
    return 0
