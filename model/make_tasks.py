"""Make single-line exact-match tasks from the held-out (validation) stdlib files.

    python -m dg_edit.model.make_tasks --out runs/exact_valid.jsonl [--n 200] [--context 2000]

Each task is one non-blank source line (its indentation included) with the text before it as
the prefix (cut at a line boundary to about ``--context`` tokens) and the rest of the file
(up to ``--suffix-chars`` characters) as the suffix: ``{"prefix", "suffix", "middle", "file",
"line"}``; ``middle`` ends with its newline.  Lines are drawn with a fixed seed, preferring
lines with at least ``--context`` tokens before them, so the file is the same on every run
with the same interpreter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from . import corpus as corpus_mod

DEFAULT_TOKENIZER = Path(__file__).resolve().parent / "default" / "tokenizer.json"


def make_tasks(n: int = 200, context: int = 2000, suffix_chars: int = 2000, seed: int = 0,
               max_line_chars: int = 100) -> list[dict]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEFAULT_TOKENIZER))
    _, valid = corpus_mod.split(corpus_mod.iter_files())
    rng = np.random.default_rng(seed)
    candidates = []  # (file index, char offset of line start, line end)
    for fi, f in enumerate(valid):
        text = f.text
        pos = 0
        for line in text.splitlines(keepends=True):
            body = line.strip()
            if body and len(line) <= max_line_chars and not body.startswith("#") and line.endswith("\n"):
                candidates.append((fi, pos, pos + len(line)))
            pos += len(line)
    order = rng.permutation(len(candidates))
    long_ctx, short_ctx = [], []
    for k in order:
        fi, a, b = candidates[k]
        text = valid[fi].text
        # cheap check first: ~3.9 characters per token on this corpus
        if a < context * 3:
            short_ctx.append(k)
            continue
        window = text[max(0, a - context * 8) : a]
        ids = tok.encode(window).ids
        if len(ids) >= context:
            long_ctx.append(k)
        else:
            short_ctx.append(k)
        if len(long_ctx) >= n:
            break
    chosen = (long_ctx + short_ctx)[:n]
    tasks = []
    for k in chosen:
        fi, a, b = candidates[k]
        text = valid[fi].text
        # prefix: whole lines, the last ~`context` tokens before the line
        w0 = max(0, a - context * 8)
        enc = tok.encode(text[w0:a])
        start = w0
        if len(enc.ids) > context:
            start = w0 + enc.offsets[len(enc.ids) - context][0]
            nl = text.find("\n", start, a)
            start = nl + 1 if nl >= 0 else start
        elif w0 > 0:
            nl = text.find("\n", w0, a)
            start = nl + 1 if nl >= 0 else w0
        tasks.append(dict(prefix=text[start:a], suffix=text[b : b + suffix_chars], middle=text[a:b],
                          file=valid[fi].rel, line=text.count("\n", 0, a) + 1))
    return tasks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dg_edit.model.make_tasks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/exact_valid.jsonl"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--context", type=int, default=2000, help="prefix tokens (about)")
    ap.add_argument("--suffix-chars", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tasks = make_tasks(args.n, args.context, args.suffix_chars, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for t in tasks:
            f.write(json.dumps(t) + "\n")
    print(f"wrote {len(tasks)} tasks to {args.out} ({corpus_mod.python_version()} validation files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
