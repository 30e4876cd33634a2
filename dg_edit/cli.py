"""`dg-edit` command line: infill, info, eval, and the three front ends (lsp, serve, tui).

Front ends live in their own modules and parse their own arguments; this file only dispatches, so
`dg-edit lsp --help` is answered by the language server itself. Errors print one line on stderr and
exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from dg_edit.distributed import add_parallel_arguments, parallel_requested, run_launched
from dg_edit.errors import UsageError
from dg_edit.startup import add_model_arguments, check_install, load_engine

# subcommand -> (module, help); each module has `main(argv) -> int`
FRONT_ENDS = {
    "lsp": ("dg_edit.lsp.server", "language server (stdio, or --tcp HOST:PORT)"),
    "serve": ("dg_edit.serve.app", "websocket service streaming the canvas to web editors"),
    "tui": ("dg_edit.tui.app", "terminal editor that animates a live rewrite"),
    "eval": ("dg_edit.model.eval", "evaluate a model (humaneval-infilling, exact)"),
}


def _parse_at(value: str) -> tuple[int, int]:
    try:
        line, col = value.split(":")
        line_no, col_no = int(line), int(col)
    except ValueError:
        raise UsageError(f"--at must be LINE:COL (1-based), got {value!r}") from None
    if line_no < 1 or col_no < 1:
        raise UsageError(f"--at is 1-based: LINE and COL must be >= 1, got {value!r}")
    return line_no, col_no


def split_at(text: str, line_no: int, col_no: int) -> tuple[str, str]:
    """Prefix and suffix of `text` around a 1-based LINE:COL cursor (COL counts characters)."""
    lines = text.split("\n")
    if line_no > len(lines):
        raise UsageError(f"line {line_no} is past the end of the file ({len(lines)} lines)")
    line = lines[line_no - 1]
    if col_no > len(line) + 1:
        raise UsageError(f"column {col_no} is past the end of line {line_no} ({len(line)} characters)")
    offset = sum(len(l) + 1 for l in lines[: line_no - 1]) + col_no - 1
    return text[:offset], text[offset:]


def _read_text_file(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"file not found: {path}")
    if p.is_dir():
        raise UsageError(f"{path} is a directory, not a file")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (byte {e.start}); dg-edit edits text files") from None


_JSON_FIELDS = {"id", "prefix", "suffix", "max_new_tokens", "seed", "single_line"}


def infill_json_line(engine, line: str) -> dict[str, Any]:
    """One `dg-edit infill --json` request line to one reply object (never raises for bad input)."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as e:
        return {"id": None, "error": f"not JSON: {e.msg} at column {e.colno}"}
    if not isinstance(request, dict):
        return {"id": None, "error": "each line must be a JSON object"}
    rid = request.get("id")
    unknown = sorted(set(request) - _JSON_FIELDS)
    if unknown:
        return {"id": rid, "error": f"unknown field(s): {', '.join(unknown)}"}
    if "prefix" not in request:
        return {"id": rid, "error": "missing field: prefix"}
    try:
        r = engine.infill(request["prefix"], request.get("suffix", ""),
                          max_new_tokens=request.get("max_new_tokens"), seed=request.get("seed"),
                          single_line=request.get("single_line"))
    except ValueError as e:
        return {"id": rid, "error": str(e)}
    except RuntimeError as e:  # the model failed (under --parallel: the launch did); the line still gets its answer
        return {"id": rid, "error": f"model failure: {type(e).__name__}: {e}"}
    return {"id": rid, "text": r.text, "steps": r.steps, "tokens_per_forward": round(r.tokens_per_forward, 3),
            "ms": round(r.ms, 1)}


def _request_lines(stdin: TextIO):
    """Lines of stdin, decoded one at a time so that bytes that are not UTF-8 cost that line only.

    (Iterating a strict UTF-8 `sys.stdin` raises at the first bad byte and ends the whole run.)
    Undecodable bytes become lone surrogates, which the JSON parser or the engine's text check then
    reports as that line's error.
    """
    raw = getattr(stdin, "buffer", None)
    if raw is None:
        yield from stdin
        return
    for data in raw:
        yield data.decode("utf-8", "surrogateescape")


def _json_reply(reply: dict[str, Any]) -> str:
    """One reply line: UTF-8 where possible; \\u escapes when the request echoed lone surrogates
    (an id like "\\ud800" is valid JSON but cannot be written as UTF-8)."""
    text = json.dumps(reply, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(reply)
    return text


def cmd_infill(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    if args.json:
        if args.file:
            raise UsageError("give either FILE --at LINE:COL or --json (requests on stdin), not both")
        engine = load_engine(args)
        for line in _request_lines(stdin):
            if not line.strip():
                continue
            stdout.write(_json_reply(infill_json_line(engine, line)) + "\n")
            stdout.flush()
        return 0
    if not args.file or not args.at:
        raise UsageError("usage: dg-edit infill FILE --at LINE:COL  (or dg-edit infill --json < requests.jsonl)")
    line_no, col_no = _parse_at(args.at)
    text = _read_text_file(args.file)
    prefix, suffix = split_at(text, line_no, col_no)
    engine = load_engine(args)
    try:
        r = engine.infill(prefix, suffix, max_new_tokens=args.max_new_tokens, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.show:
        stdout.write(prefix + "\x1b[32m" + r.text + "\x1b[0m" + suffix)
    else:
        stdout.write(r.text + ("\n" if not r.text.endswith("\n") else ""))
    sys.stderr.write(f"[dg-edit] {r.steps} steps, {r.tokens_per_forward:.2f} tokens/forward, {r.ms:.0f} ms\n")
    return 0


def cmd_info(args: argparse.Namespace, stdout: TextIO) -> int:
    engine = load_engine(args)
    info = engine.info()
    if args.json:
        stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        for key, value in info.items():
            stdout.write(f"{key:14} {value}\n")
    return 0


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    from .plan import DEFAULT_ROWS
    from .quantize import QUANTIZE_CHOICES

    parser.add_argument("model", metavar="MODEL_DIR_OR_CONFIG", help="model directory or its config.json")
    parser.add_argument("--quantize", default="none", help=f"one of {', '.join(QUANTIZE_CHOICES)} (default none)")
    parser.add_argument("--dtype", default="auto",
                        help="load dtype (default auto: the checkpoint's dtype on a GPU, float32 on a CPU)")
    parser.add_argument("--gpu-memory", metavar="SIZE", default=None,
                        help="plan for a GPU with this much memory, e.g. 80GB or 24GiB (default: the free memory "
                             "of this machine's GPU, or its available RAM when it has none)")
    parser.add_argument("--device", default=None, help="plan for this device (default: cuda with --gpu-memory or a "
                                                       "GPU present, else cpu)")
    parser.add_argument("--slots", type=int, default=None, help="canvas slots L (default: the config's canvas_length)")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help=f"candidate rows B (default {DEFAULT_ROWS})")
    parser.add_argument("--prefix-tokens", type=int, default=None,
                        help="prefix tokens in the encoder cache (default: Settings.max_prefix_tokens, 2048)")
    parser.add_argument("--cache-budget-mb", type=int, default=None,
                        help="document encoder caches (default: Settings.cache_budget_mb, 1024)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_plan(args: argparse.Namespace, stdout: TextIO) -> int:
    """`dg-edit plan ...`: the memory plan (dg_edit.plan) of a model, from its config alone."""
    import torch

    from .config import Settings
    from .loading import resolve_dtype
    from .plan import checkpoint_dtype, device_budget, load_config, make_plan, parse_size
    from .quantize import check_choice

    try:
        config = load_config(args.model)
        device = args.device or ("cuda" if args.gpu_memory or torch.cuda.is_available() else "cpu")
        dtype = resolve_dtype(args.dtype, device, checkpoint_dtype(config))
        quantize = check_choice(args.quantize)
        if args.gpu_memory:
            budget, source = parse_size(args.gpu_memory), "--gpu-memory"
        else:
            budget, source = device_budget(device)
        for name in ("slots", "rows", "prefix_tokens"):
            value = getattr(args, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        prefix = args.prefix_tokens or Settings().max_prefix_tokens
        if args.cache_budget_mb is not None and args.cache_budget_mb < 0:
            raise ValueError(f"--cache-budget-mb must be >= 0, got {args.cache_budget_mb}")
        cache_mb = Settings().cache_budget_mb if args.cache_budget_mb is None else args.cache_budget_mb
        plan = make_plan(config, name=str(args.model), dtype=dtype, quantize=quantize, device=device,
                         slots=args.slots, rows=args.rows, prefix_tokens=prefix, budget_bytes=budget,
                         budget_source=source, cache_bytes=cache_mb << 20)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    stdout.write(json.dumps(plan.to_dict(), indent=2) + "\n" if args.json else plan.text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dg-edit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("infill", help="infill at a cursor in a file, or JSON lines from stdin")
    p.add_argument("file", nargs="?", help="file to infill in")
    p.add_argument("--at", metavar="LINE:COL", help="1-based cursor position")
    p.add_argument("--json", action="store_true", help='read {"prefix","suffix"?,...} lines from stdin')
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--show", action="store_true", help="print the whole file with the infill highlighted")
    add_model_arguments(p)
    add_parallel_arguments(p)
    p = sub.add_parser("info", help="model, parameters, device, dtype, canvas length")
    p.add_argument("--json", action="store_true")
    add_model_arguments(p)
    p = sub.add_parser("plan", help="memory plan: weights, KV cache and step memory of a model, and whether it fits",
                       description="Memory plan: will this DiffusionGemma fit, before a byte of its weights is read?")
    add_plan_arguments(p)
    for name, (_, help_text) in FRONT_ENDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if parallel_requested(argv):  # under torchrun: the launch is ended (every rank stopped) when this returns
        return run_launched(lambda: _dispatch(argv))
    return _dispatch(argv)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in FRONT_ENDS and not {"-h", "--help"} & set(argv[1:]):
        try:
            check_install()
        except UsageError as e:
            print(f"dg-edit {argv[0]}: {e}", file=sys.stderr)
            return 2
    if argv and argv[0] in FRONT_ENDS:
        module = importlib.import_module(FRONT_ENDS[argv[0]][0])
        try:
            return int(module.main(argv[1:]) or 0)
        except UsageError as e:
            print(f"dg-edit {argv[0]}: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("infill", "info", "plan"):
            check_install()
        if args.command == "infill":
            return cmd_infill(args, sys.stdin, sys.stdout)
        if args.command == "info":
            return cmd_info(args, sys.stdout)
        if args.command == "plan":
            return cmd_plan(args, sys.stdout)
        parser.print_help()
        return 2
    except UsageError as e:
        print(f"dg-edit: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
