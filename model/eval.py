"""Evaluation harness: `dg-edit eval ...` (also `python -m dg_edit.model.eval ...`).

    dg-edit eval humaneval-infilling --split single-line [--limit N] [--model DIR] [--data DIR]
    dg-edit eval exact FILE.jsonl [--limit N] [--model DIR]
    dg-edit eval next-edit FILE.jsonl [--limit N] [--model DIR]

Every model figure is printed beside the same figure for two trivial baselines: an empty
middle, and a copy of the previous line.

HumanEval-Infilling: each completion is run as
``prompt + completion + suffix + "\\n" + test + "\\n" + f"check({entry_point})"`` in a separate
Python process with a timeout (3 s by default); pass@1 is the fraction that exit 0.  For the
single-line split the engine is asked for one line (``single_line=True``) and the line's
newline is added back, as the split's middles are whole lines.

exact: tasks ``{"prefix", "suffix", "middle"}`` (make them from held-out stdlib files with
``python -m dg_edit.model.make_tasks``); a task is an exact match when the first line of the
infill equals the middle with trailing whitespace ignored.

next-edit: cases from ``python -m dg_edit.model.next_edit_data`` (the committed set is
``bench/next_edit_cases.jsonl``); figures and baselines in ``next_edit_eval.py``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "bench" / "humaneval-infilling"
SPLITS = {
    "single-line": "HumanEval-SingleLineInfilling.jsonl.gz",
    "multi-line": "HumanEval-MultiLineInfilling.jsonl.gz",
    "random-span": "HumanEval-RandomSpanInfilling.jsonl.gz",
    "random-span-light": "HumanEval-RandomSpanInfillingLight.jsonl.gz",
}
BASELINES = ("empty", "prev-line")


# --------------------------------------------------------------------------- helpers


def previous_line(prefix: str) -> str:
    """The last complete line before the cursor (without its newline); '' if there is none."""
    lines = prefix.split("\n")
    # lines[-1] is the (possibly empty) text of the cursor's own line before the cursor
    return lines[-2] if len(lines) >= 2 else ""


def baseline_completion(name: str, prefix: str, line_shaped: bool) -> str:
    if name == "empty":
        return ""
    if name == "prev-line":
        prev = previous_line(prefix)
        return prev + "\n" if line_shaped else prev
    raise ValueError(name)


class Progress:
    """A one-line progress bar on stderr (tqdm when available)."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.t0 = total, desc, 0, time.time()
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)
        except ImportError:  # pragma: no cover - tqdm comes with transformers (via huggingface_hub)
            self.bar = None

    def update(self, **postfix) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        else:
            sys.stderr.write(f"\r{self.desc} {self.n}/{self.total} {postfix}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")


def run_program(source: str, timeout: float) -> bool:
    """Run `source` in a fresh interpreter (isolated mode, temporary cwd); True when it exits 0."""
    with tempfile.TemporaryDirectory(prefix="dg-eval-") as d:
        path = Path(d) / "prog.py"
        path.write_text(source, encoding="utf-8")
        try:
            r = subprocess.run([sys.executable, "-I", str(path)], cwd=d, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
            return r.returncode == 0
        except subprocess.TimeoutExpired:
            return False


def load_engine(model_dir: str | None, dtype: str | None = None, quantize: str = "none"):
    from dg_edit import Engine
    from dg_edit.errors import UsageError
    from dg_edit.loading import LoadOptions

    try:  # an unknown or missing quantization library, a model that cannot fit: one line, exit 2
        return Engine.load(model_dir, dtype=dtype, options=LoadOptions(quantize=quantize))
    except ValueError as e:
        raise UsageError(str(e)) from None


def edit_similarity(a: str, b: str) -> float:
    """difflib's ratio in [0, 1]: a softer figure than exact match for weak models."""
    import difflib

    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def pct(k: int, n: int) -> str:
    return f"{100.0 * k / max(n, 1):5.1f}% ({k}/{n})"


def tokens_per_forward(results) -> float:
    """All answer tokens over all decoder passes (`Done`s). Not a mean of per-request ratios, which
    would favour the requests that end after one pass; this is the rate the passes actually ran at."""
    passes = sum(r.steps for r in results)
    return sum(r.tokens_per_forward * r.steps for r in results) / passes if passes else 0.0


# --------------------------------------------------------------------------- humaneval-infilling


def read_problems(data_dir: Path, split: str) -> list[dict]:
    path = Path(data_dir) / SPLITS[split]
    if not path.exists():
        raise FileNotFoundError(f"HumanEval-Infilling data not found: {path} (use --data DIR)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval(args) -> int:
    problems = read_problems(args.data, args.split)[:: max(1, args.every)]
    if args.limit:
        problems = problems[: args.limit]
    engine = load_engine(args.model, args.dtype, args.quantize)
    single = args.split == "single-line"
    sampling = json.loads(args.sampling) if args.sampling else {}
    names = ("model",) + BASELINES
    passed = {k: 0 for k in names}
    latencies: list[float] = []
    dones: list = []
    records = []
    prog = Progress(len(problems), f"humaneval-infilling {args.split}")

    def program(p: dict, completion: str) -> str:
        return p["prompt"] + completion + p["suffix"] + "\n" + p["test"] + "\n" + f"check({p['entry_point']})\n"

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = []
        for p in problems:
            kw = dict(seed=args.seed, **sampling)
            if args.max_new_tokens:
                kw["max_new_tokens"] = args.max_new_tokens
            if single:
                kw["single_line"] = True
            r = engine.infill(p["prompt"], p["suffix"], **kw)
            completion = r.text
            if single:
                completion = completion.split("\n", 1)[0].rstrip("\n") + "\n"
            latencies.append(r.ms)
            dones.append(r)
            line_shaped = p["prompt"].endswith("\n") or not p["prompt"]
            comps = {"model": completion}
            for b in BASELINES:
                comps[b] = baseline_completion(b, p["prompt"], line_shaped)
            futs = {k: pool.submit(run_program, program(p, c), args.timeout) for k, c in comps.items()}
            futures.append((p, comps, futs, r))
            done_ok = sum(1 for (_, _, f, _) in futures if f["model"].done() and f["model"].result())
            prog.update(ms=f"{r.ms:.0f}", model_pass=done_ok)
        for p, comps, futs, r in futures:
            res = {k: f.result() for k, f in futs.items()}
            for k, ok in res.items():
                passed[k] += int(ok)
            records.append(dict(task_id=p["task_id"], completion=comps["model"], passed=res["model"],
                                baselines={b: res[b] for b in BASELINES}, ms=round(r.ms, 1), steps=r.steps,
                                tokens_per_forward=round(r.tokens_per_forward, 3)))
    prog.close()
    n = len(problems)
    med = statistics.median(latencies) if latencies else 0.0
    overall_tpf = tokens_per_forward(dones)
    print(f"humaneval-infilling {args.split}: {n} problems (model {engine.name})")
    print(f"  model      pass@1 {pct(passed['model'], n)}   median latency {med:.0f} ms   "
          f"tokens/forward {overall_tpf:.2f}")
    for b in BASELINES:
        print(f"  {b:<10} pass@1 {pct(passed[b], n)}")
    summary = dict(task="humaneval-infilling", split=args.split, n=n, model=engine.name,
                   pass_at_1={k: passed[k] / max(n, 1) for k in names}, median_ms=med,
                   tokens_per_forward=overall_tpf)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(summary=summary, records=records), indent=1) + "\n")
    return 0


# --------------------------------------------------------------------------- exact


def exact(args) -> int:
    tasks = [json.loads(x) for x in Path(args.file).read_text(encoding="utf-8").splitlines() if x.strip()]
    tasks = tasks[:: max(1, args.every)]
    if args.limit:
        tasks = tasks[: args.limit]
    engine = load_engine(args.model, args.dtype, args.quantize)
    sampling = json.loads(args.sampling) if args.sampling else {}
    names = ("model",) + BASELINES
    hits = {k: 0 for k in names}
    sims = {k: [] for k in names}
    lat: list[float] = []
    warm: list[float] = []
    dones: list = []
    records = []
    prog = Progress(len(tasks), "exact")
    for i, t in enumerate(tasks):
        target = t["middle"].split("\n", 1)[0].rstrip()
        kw = dict(seed=args.seed, single_line=True, **sampling)
        if args.max_new_tokens:
            kw["max_new_tokens"] = args.max_new_tokens
        if args.warm:
            session = f"exact-{i}"
            r = engine.infill(t["prefix"], t["suffix"], session=session, **kw)
            r2 = engine.infill(t["prefix"], t["suffix"], session=session, **kw)
            warm.append(r2.ms)
            engine.forget(session)
        else:
            r = engine.infill(t["prefix"], t["suffix"], **kw)
        pred = r.text.split("\n", 1)[0].rstrip()
        ok = pred == target
        hits["model"] += int(ok)
        sims["model"].append(edit_similarity(pred, target))
        lat.append(r.ms)
        dones.append(r)
        base = {}
        for b in BASELINES:
            c = baseline_completion(b, t["prefix"], False).split("\n", 1)[0].rstrip()
            base[b] = c == target
            hits[b] += int(base[b])
            sims[b].append(edit_similarity(c, target))
        records.append(dict(i=i, pred=pred, target=target, ok=ok, baselines=base, ms=round(r.ms, 1), steps=r.steps,
                            tokens_per_forward=round(r.tokens_per_forward, 3)))
        prog.update(ms=f"{r.ms:.0f}", exact=hits["model"])
    prog.close()
    n = len(tasks)
    med = statistics.median(lat) if lat else 0.0
    print(f"exact: {n} tasks from {args.file} (model {engine.name})")
    sim = {k: statistics.fmean(v) if v else 0.0 for k, v in sims.items()}
    line = (f"  model      exact {pct(hits['model'], n)}   edit-sim {sim['model']:.3f}   median latency {med:.0f} ms   "
            f"tokens/forward {tokens_per_forward(dones):.2f}")
    if warm:
        line += f"   warm median {statistics.median(warm):.0f} ms"
    print(line)
    for b in BASELINES:
        print(f"  {b:<10} exact {pct(hits[b], n)}   edit-sim {sim[b]:.3f}")
    if args.json:
        summary = dict(task="exact", file=str(args.file), n=n, model=engine.name,
                       exact={k: hits[k] / max(n, 1) for k in names}, edit_similarity=sim, median_ms=med,
                       warm_median_ms=statistics.median(warm) if warm else None, tokens_per_forward=tokens_per_forward(dones))
        Path(args.json).write_text(json.dumps(dict(summary=summary, records=records), indent=1) + "\n")
    return 0


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dg-edit eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="task", required=True)

    def common(p):
        p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
        p.add_argument("--dtype", default=None, help="float32 (default) or bfloat16 (faster on CPUs with bf16 units)")
        p.add_argument("--quantize", default="none", help="none (default), int8, nf4 or fp8 (see dg-edit plan)")
        p.add_argument("--limit", type=int, default=0, help="only the first N tasks")
        p.add_argument("--every", type=int, default=1,
                       help="only every K-th task (an even sample across problems), before --limit")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--max-new-tokens", type=int, default=0)
        p.add_argument("--sampling", default="", help='JSON sampling overrides, e.g. \'{"max_denoising_steps": 12}\'')
        p.add_argument("--json", default="", help="also write per-task results here")
        p.add_argument("--threads", type=int, default=1,
                       help="torch intra-op threads (1 by default: on a shared 2-core machine more threads "
                            "make every small op wait for a descheduled peer)")

    h = sub.add_parser("humaneval-infilling", help="pass@1 on HumanEval-Infilling")
    h.add_argument("--split", choices=sorted(SPLITS), default="single-line")
    h.add_argument("--data", type=Path, default=DEFAULT_DATA)
    h.add_argument("--timeout", type=float, default=3.0)
    h.add_argument("--jobs", type=int, default=2, help="test processes run in parallel")
    common(h)
    e = sub.add_parser("exact", help="exact match of single-line infills")
    e.add_argument("file", type=Path)
    e.add_argument("--warm", action="store_true", help="also time a second request with the prefix cached")
    common(e)
    n = sub.add_parser("next-edit", help="next-edit prediction: exact window, location, rightly nothing")
    n.add_argument("file", type=Path)
    common(n)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.task == "humaneval-infilling":
            return humaneval(args)
        if args.task == "next-edit":
            from . import next_edit_eval

            return next_edit_eval.run(args, load_engine(args.model, args.dtype, args.quantize), Progress)
        return exact(args)
    except FileNotFoundError as e:
        print(f"dg-edit eval: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
