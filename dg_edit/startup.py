"""Start-up shared by every command that loads a model: its arguments, its settings, its engine.

Why a core module of its own: the CLI, each front end (`dg-edit serve`, `dg-edit lsp`, `dg-edit tui`)
and `dg_edit.distributed` (every rank of a --parallel launch loads its shard through the same
options) all turn the same command-line arguments into a `Settings`, a `LoadOptions` and an engine.
The core never imports the CLI (`dg_edit.cli` only dispatches), so the code they share lives here.
"""

from __future__ import annotations

import argparse

from .errors import UsageError


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


def check_install() -> None:
    """Refuse, in one line, to run a model command on a transformers release outside the tested range."""
    from .hf_adapter import check_transformers

    try:
        check_transformers()
    except ValueError as e:
        raise UsageError(str(e)) from None
