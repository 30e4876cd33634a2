"""Make the next-edit evaluation set from real code the embedded model never saw.

    python -m dg_edit.model.next_edit_data --out bench/next_edit_cases.jsonl [--per-kind 100]

The embedded model was trained on the CPython standard library only (model/corpus.py; MODEL_CARD.md).
The cases come from the sources of installed third-party packages (`rich` and `textual` by default,
their versions recorded in every case), read with `ast`, so that each edit is made on real code:

- `rename_local`: a function's local variable renamed where it is first assigned; expected next: the
  same rename at its remaining uses (all within `NEAR_LINES` lines, so a window around the cursor can
  hold them).
- `add_param`: a function's last positional parameter and the matching argument at its call sites in
  the same file are taken out (the code *before*); the edit puts the parameter back into the
  definition; expected next: the real argument back at the call sites within `NEAR_LINES` lines.
- `repeat_pattern`: an attribute or method name used on several nearby lines of the same shape
  (`self.x.append(...)` on consecutive lines) renamed on the first of them; expected next: the same
  rename on the others.
- `*_done` (negatives): the same changes already made everywhere, the last of them just now;
  expected next: nothing.

Each line of the JSONL: {"id", "kind", "source" (package==version:path:line), "text" (the document
after the recent edits), "cursor" (character offset: the end of the last edit), "edits" (the recent
edits, oldest first, each indexing the text before it), "expected" (the next edits, indexing
`text`; [] = none expected)}. Offsets are Python string indices. Deterministic: the same package
versions give the same file.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import json
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("rich", "textual")
NEAR_LINES = 8  # the next edits lie within this many lines below the cursor's line
MAX_FILE_CHARS = 60_000
BEFORE_CHARS, AFTER_CHARS = 2400, 1200  # each case keeps this much of its file around the cursor (whole lines)


@dataclass(frozen=True)
class Edit:
    start: int
    end: int
    text: str
    old_text: str

    def json(self) -> dict:
        return {"start": self.start, "end": self.end, "text": self.text, "old_text": self.old_text}


def apply(text: str, edit: Edit) -> str:
    assert text[edit.start: edit.end] == edit.old_text, (edit, text[edit.start: edit.end])
    return text[: edit.start] + edit.text + text[edit.end:]


def sequential(text: str, spans: list[tuple[int, int, str]]) -> tuple[str, list[Edit]]:
    """Make replacements (offsets into `text`, ascending, not overlapping) one by one, in order: the
    edits as recorded (each indexing the text before it), and the text after all of them."""
    edits, shift = [], 0
    for start, end, new in spans:
        edit = Edit(start + shift, end + shift, new, text[start:end])
        edits.append(edit)
        shift += len(new) - (end - start)
    out = text
    for edit in edits:
        out = apply(out, edit)
    return out, edits


def shifted(spans: list[tuple[int, int, str]], after: list[tuple[int, int, str]], text: str) -> list[Edit]:
    """`spans` (offsets into `text`) as edits indexing `text` with the `after` replacements made."""
    out = []
    for start, end, new in spans:
        shift = sum(len(n) - (e - s) for s, e, n in after if e <= start)
        out.append(Edit(start + shift, end + shift, new, text[start:end]))
    return out


class Offsets:
    """ast (line, UTF-8 column) positions to character offsets."""

    def __init__(self, text: str):
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def at(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8", "replace"))

    def line_of(self, offset: int) -> int:
        lo, hi = 0, len(self.starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo


def _keep(key: str, permille: int) -> bool:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 1000 < permille


# ------------------------------------------------------------------------------------------ kinds
def rename_cases(text: str, tree: ast.AST, where: str):
    off = Offsets(text)
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        params = {a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)}
        names: dict[str, list[ast.Name]] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Name):
                names.setdefault(node.id, []).append(node)
        for name, nodes in sorted(names.items()):
            nodes.sort(key=lambda n: (n.lineno, n.col_offset))
            first = nodes[0]
            if name in params or len(name) < 2 or not isinstance(first.ctx, ast.Store) or len(nodes) < 2:
                continue
            if nodes[-1].lineno - first.lineno > NEAR_LINES or first.lineno == nodes[1].lineno:
                continue
            new = f"new_{name}"
            if new in text:
                continue
            spans = [(off.at(n.lineno, n.col_offset), off.at(n.end_lineno, n.end_col_offset), new) for n in nodes]
            if any(text[s:e] != name for s, e, _ in spans):
                continue
            yield "rename", f"{where}:{first.lineno}:{name}", spans


def add_param_cases(text: str, tree: ast.AST, where: str):
    off = Offsets(text)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        args = fn.args
        positional = [*args.posonlyargs, *args.args]
        is_method = bool(positional) and positional[0].arg in ("self", "cls")
        own = positional[1:] if is_method else positional
        if not own or args.defaults or args.vararg or args.kwarg or args.kwonlyargs:
            continue
        last = own[-1]
        body_end = fn.end_lineno or fn.lineno
        sites = []
        for call in calls:
            f = call.func
            named = (isinstance(f, ast.Name) and f.id == fn.name and not is_method) or \
                    (isinstance(f, ast.Attribute) and f.attr == fn.name and is_method)
            if not named or call.keywords or len(call.args) != len(own):
                continue
            if any(isinstance(a, ast.Starred) for a in call.args):
                continue
            if not fn.lineno < call.lineno <= body_end + NEAR_LINES:
                continue
            sites.append(call)
        if not sites:
            continue
        sites.sort(key=lambda c: (c.lineno, c.col_offset))
        if sites[-1].lineno - sites[0].lineno > NEAR_LINES:
            continue

        def cut(items, i):
            """(start, end) of item i with the separator before it (or the whole item when it is alone)."""
            node = items[i]
            end = off.at(node.end_lineno, node.end_col_offset)
            if i > 0:
                prev = items[i - 1]
                return off.at(prev.end_lineno, prev.end_col_offset), end
            return off.at(node.lineno, node.col_offset), end

        def_span = cut(positional, len(positional) - 1)
        site_spans = [cut(call.args, len(call.args) - 1) for call in sites]
        if any(text[s:e].count("\n") for s, e in [def_span, *site_spans]):
            continue
        yield "add_param", f"{where}:{fn.lineno}:{fn.name}", def_span, site_spans, last.arg


def pattern_cases(text: str, tree: ast.AST, where: str):
    off = Offsets(text)
    by_line: dict[int, list[ast.Attribute]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.lineno == node.end_lineno:
            by_line.setdefault(node.lineno, []).append(node)
    lines = text.splitlines()
    for lineno in sorted(by_line):
        for attr in sorted(by_line[lineno], key=lambda a: a.col_offset):
            name = attr.attr
            if len(name) < 3:
                continue
            shape = _shape(lines[lineno - 1])
            group = [attr]
            for other in range(lineno + 1, lineno + 4):
                match = [a for a in by_line.get(other, []) if a.attr == name and _shape(lines[other - 1]) == shape]
                if not match:
                    break
                group.append(match[0])
            prev = [a for a in by_line.get(lineno - 1, []) if a.attr == name]
            if len(group) < 2 or prev:  # only the first line of a run
                continue
            new = f"{name}_new"
            if new in text:
                continue
            spans = []
            for a in group:
                end = off.at(a.end_lineno, a.end_col_offset)
                spans.append((end - len(name), end, new))
            if any(text[s:e] != name for s, e, _ in spans):
                continue
            yield "pattern", f"{where}:{lineno}:{name}", spans


def _shape(line: str) -> str:
    """A line with its names and literals blanked: lines of one shape differ only in those."""
    import io
    import tokenize

    try:
        toks = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return line
    return " ".join("N" if t.type in (tokenize.NAME, tokenize.NUMBER, tokenize.STRING) else t.string for t in toks
                    if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER))


# ------------------------------------------------------------------------------------------ cases
def case_from_spans(kind: str, key: str, text: str, spans: list[tuple[int, int, str]]) -> list[dict]:
    """A change made at `spans` (the first is the edit made, the rest expected), and its negative."""
    out = []
    after_first, history = sequential(text, spans[:1])
    expected = shifted(spans[1:], spans[:1], text)
    out.append({"kind": kind, "key": key, "text": after_first, "cursor": history[-1].start + len(history[-1].text),
                "edits": [e.json() for e in history], "expected": [e.json() for e in expected]})
    done, history = sequential(text, spans)
    out.append({"kind": f"{kind}_done", "key": key, "text": done, "cursor": history[-1].start + len(history[-1].text),
                "edits": [e.json() for e in history], "expected": []})
    return out


def crop(case: dict) -> dict:
    """The case cut to whole lines around its edits (`BEFORE_CHARS` before the cursor and its first
    recorded edit, `AFTER_CHARS` after the cursor and its expected edits), offsets moved along: the
    set stays small, and the engine conditions on a few thousand characters around the cursor anyway."""
    text, cursor = case["text"], case["cursor"]
    # Recorded edits index older texts; in the final text they lie near the cursor (within the function).
    lo = min([cursor] + [e["start"] for e in case["edits"]]) - BEFORE_CHARS
    hi = max([cursor] + [e["end"] for e in case["expected"]]) + AFTER_CHARS
    lo = 0 if lo <= 0 else text.find("\n", lo) + 1
    hi = len(text) if hi >= len(text) else (text.find("\n", hi) + 1 or len(text))
    # Recorded edits replay on the cut text only if they all lie inside it, offsets moved by lo.
    moved = [{**e, "start": e["start"] - lo, "end": e["end"] - lo} for e in case["edits"]]
    if any(e["start"] < 0 for e in moved):
        return case
    return {**case, "text": text[lo:hi], "cursor": cursor - lo, "edits": moved,
            "expected": [{**e, "start": e["start"] - lo, "end": e["end"] - lo} for e in case["expected"]]}


def cases_for_file(text: str, where: str) -> list[dict]:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    out = []
    for _, key, spans in rename_cases(text, tree, where):
        out += case_from_spans("rename_local", key, text, spans)
    for _, key, spans in pattern_cases(text, tree, where):
        out += case_from_spans("repeat_pattern", key, text, spans)
    for _, key, (ds, de), sites, _param in add_param_cases(text, tree, where):
        # The code before: no parameter, no arguments. The edit made: the parameter back in the definition.
        removed = sorted([(ds, de, ""), *[(s, e, "") for s, e in sites]])
        before, _ = sequential(text, removed)
        restore = []  # spans into `before` that put each piece back, the definition's first
        shift = 0
        for s, e, _n in removed:
            restore.append((s + shift, s + shift, text[s:e]))
            shift -= e - s
        assert removed[0] == (ds, de, "")
        out += case_from_spans("add_param", key, before, restore)
    return out


def make_cases(packages=PACKAGES, per_kind: int = 100) -> list[dict]:
    by_kind: dict[str, list[dict]] = {}
    for package in packages:
        version = importlib.metadata.version(package)
        files = importlib.metadata.files(package) or []
        for f in sorted(files, key=lambda p: str(p)):
            if f.suffix != ".py":
                continue
            path = Path(f.locate())
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if len(text) > MAX_FILE_CHARS:
                continue
            where = f"{package}=={version}:{f}"
            for case in map(crop, cases_for_file(text, where)):
                by_kind.setdefault(case["kind"], []).append(case)
    out = []
    for kind in sorted(by_kind):
        # A spread over files, not the first files' cases: by a hash of the case's key, then the key.
        ranked = sorted(by_kind[kind], key=lambda c: (hashlib.sha256(c["key"].encode()).hexdigest(), c["key"]))
        for case in ranked[:per_kind]:
            case = {"id": f"{kind}:{case['key']}", "kind": kind, "source": case["key"], **{
                k: case[k] for k in ("text", "cursor", "edits", "expected")}}
            out.append(case)
    out.sort(key=lambda c: c["id"])
    return out


def check(case: dict) -> None:
    """The recorded edits undo to a text they replay on, and the expected edits index the text."""
    text = case["text"]
    for e in reversed(case["edits"]):  # undo, newest first
        assert text[e["start"]: e["start"] + len(e["text"])] == e["text"], (case["id"], e)
        text = text[: e["start"]] + e["old_text"] + text[e["start"] + len(e["text"]):]
    for e in case["edits"]:
        text = text[: e["start"]] + e["text"] + text[e["end"]:]
    assert text == case["text"]
    for e in case["expected"]:
        assert 0 <= e["start"] <= e["end"] <= len(case["text"])
        assert case["text"][e["start"]: e["end"]] == e["old_text"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-kind", type=int, default=50, help="cases per kind (positives and negatives each)")
    ap.add_argument("--packages", nargs="+", default=list(PACKAGES))
    args = ap.parse_args(argv)
    cases = make_cases(args.packages, args.per_kind)
    for case in cases:
        check(case)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as fh:
        for case in cases:
            fh.write(json.dumps(case, ensure_ascii=False) + "\n")
    kinds: dict[str, int] = {}
    for case in cases:
        kinds[case["kind"]] = kinds.get(case["kind"], 0) + 1
    print(f"{len(cases)} cases -> {args.out}: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
