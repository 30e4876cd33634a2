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

# subcommand -> (module, help); each module has `main(argv) -> int`
FRONT_ENDS = {
    "lsp": ("dg_edit.lsp.server", "language server (stdio, or --tcp HOST:PORT)"),
    "serve": ("dg_edit.serve.app", "websocket service streaming the canvas to web editors"),
    "tui": ("dg_edit.tui.app", "terminal editor that animates a live rewrite"),
    "eval": ("dg_edit.model.eval", "evaluate a model (humaneval-infilling, exact)"),
    "plan": ("dg_edit.plan", "memory plan: weights, KV cache and step memory of a model, and whether it fits"),
}




def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments shared by every command that loads a model (see dg_edit/loading.py)."""
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="local DiffusionGemma directory (default: the embedded model)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (default: the checkpoint's dtype on a GPU, float32 on a CPU), float32, bfloat16 "
                             "or float16")
    parser.add_argument("--quantize", default="none", metavar="{none,int8,nf4,fp8}",
                        help="quantize the weights while loading (int8/fp8: torchao, nf4: bitsandbytes; "
                             "pip install 'dg-edit[quant]'); the MoE experts included")
    parser.add_argument("--device-map", default=None, choices=["auto"],
                        help="auto: split the layers over every GPU and offload the rest to CPU RAM (accelerate)")
    parser.add_argument("--max-memory", metavar="DEV=SIZE,...", default=None,
                        help="with --device-map auto: the budget per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="run each step's tensor work through torch.compile (Settings.compile_step)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--config", metavar="FILE", default=None, help="JSON settings file (see dg_edit.config)")


def settings_from_args(args: argparse.Namespace):
    """The `Settings` for a command: defaults, then --config FILE, then --model and --compile.

    A missing or invalid settings file is the user's mistake: `UsageError`.
    """
    from .config import Settings

    try:
        settings = Settings.from_file(args.config) if getattr(args, "config", None) else Settings()
        overrides = {}
        if getattr(args, "model", None):
            overrides["model"] = args.model
        if getattr(args, "compile", None):
            overrides["compile_step"] = True
        if overrides:
            settings = Settings.from_dict(overrides, base=settings)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    return settings


def load_options(args: argparse.Namespace):
    """The `LoadOptions` the shared model arguments ask for; a bad value is a `UsageError`."""
    from .loading import LoadOptions, parse_max_memory
    from .quantize import check_choice

    try:
        return LoadOptions(device=getattr(args, "device", None), dtype=getattr(args, "dtype", None) or "auto",
                           quantize=check_choice(getattr(args, "quantize", None)),
                           device_map=getattr(args, "device_map", None),
                           max_memory=parse_max_memory(getattr(args, "max_memory", None)))
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_engine(args: argparse.Namespace):
    """Load the engine a command asked for; missing files, bad settings and a model that cannot fit
    (the memory plan's figures, before a byte is read) become `UsageError`s.

    Under --parallel (torchrun) every rank loads its shard here and only rank 0 returns, with an engine
    that runs each call on every rank (`dg_edit.distributed`).
    """
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "parallel", None):
        from .distributed import load_engine as load_parallel_engine

        return load_parallel_engine(args)
    from .engine import Engine

    settings = settings_from_args(args)
    options = load_options(args)
    try:
        return Engine.load(settings.model or None, settings=settings, options=options)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


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
    for name, (_, help_text) in FRONT_ENDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def check_install() -> None:
    """Refuse, in one line, to run a model command on a transformers release outside the tested range."""
    from .hf_adapter import check_transformers

    try:
        check_transformers()
    except ValueError as e:
        raise UsageError(str(e)) from None


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
        if args.command in ("infill", "info"):
            check_install()
        if args.command == "infill":
            return cmd_infill(args, sys.stdin, sys.stdout)
        if args.command == "info":
            return cmd_info(args, sys.stdout)
        parser.print_help()
        return 2
    except UsageError as e:
        print(f"dg-edit: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
