"""Unknown middle length: the engine's candidate choice against the oracle length, in one run.

Spans are cut from held-out standard-library files (the model's validation split): single lines,
parts of lines and short multi-line blocks. For each span the same model infills it three ways:
- oracle: one candidate of exactly the true middle length plus one slot for EOS;
- auto:   the engine's default (candidates N, N/2, N/4, ... scored by the model's evidence);
- fixed:  one candidate of N slots (the model must end the middle itself with EOS).
It prints exact match (trailing whitespace ignored) and how often `auto` picked a length that fits.

    OMP_NUM_THREADS=2 python bench/length.py [--model DIR] [--n 100]
"""

from __future__ import annotations

import argparse
import random
import statistics

from dg_edit import Engine
from dg_edit.model.corpus import iter_files, split


def spans(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """`n` (prefix, middle, suffix) triples from validation files, with ~1,000 characters of context."""
    rng = random.Random(seed)
    _, valid = split(iter_files())
    out = []
    while len(out) < n:
        text = rng.choice(valid).text
        lines = text.split("\n")
        if len(lines) < 20:
            continue
        i = rng.randrange(5, len(lines) - 5)
        kind = rng.random()
        if not lines[i].strip():
            continue
        start = sum(len(l) + 1 for l in lines[:i])
        indent = len(lines[i]) - len(lines[i].lstrip())
        if kind < 0.5:  # the rest of a line after its indentation
            a, b = start + indent, start + len(lines[i])
        elif kind < 0.8:  # the tail of a line after a random cut
            cut = rng.randrange(indent, len(lines[i]))
            a, b = start + cut, start + len(lines[i])
        else:  # two or three whole lines
            k = rng.choice([2, 3])
            a = start + indent
            b = start + sum(len(l) + 1 for l in lines[i:i + k]) - 1
        middle = text[a:b]
        if not middle.strip() or len(middle) > 160:
            continue
        out.append((text[max(0, a - 1000):a], middle, text[b:b + 400]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    engine = Engine.load(args.model)
    tok = engine.tokenizer
    results = {"oracle": [], "auto": [], "fixed": []}
    fits = []
    ms = {"oracle": [], "auto": [], "fixed": []}
    for i, (prefix, middle, suffix) in enumerate(spans(args.n)):
        m = len(tok.encode(middle, add_special_tokens=False))
        n = args.max_new_tokens
        runs = {
            "oracle": dict(lengths=[min(m + 1, n)]),
            "auto": dict(max_new_tokens=n),
            "fixed": dict(lengths=[n]),
        }
        for name, kw in runs.items():
            r = engine.infill(prefix, suffix, seed=i, single_line="\n" not in middle, **kw)
            results[name].append(r.text.rstrip() == middle.rstrip())
            ms[name].append(r.ms)
            if name == "auto":
                fits.append(r.length >= m + 1)
    print(f"{args.n} spans from held-out stdlib files, max_new_tokens {args.max_new_tokens}, "
          f"model {engine.name}")
    for name in ("oracle", "auto", "fixed"):
        em = sum(results[name]) / len(results[name])
        print(f"  {name:6} exact match {em:6.1%}   median {statistics.median(ms[name]):7.1f} ms")
    oracle = sum(results["oracle"]) or 1
    print(f"  auto / oracle exact-match ratio = {sum(results['auto']) / oracle:.2f}; "
          f"auto picked a length that fits the true middle in {sum(fits) / len(fits):.0%} of spans")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
