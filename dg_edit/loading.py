"""Loading a DiffusionGemma checkpoint the way its users need: right dtype, straight to the device, quantized.

- `--dtype auto` (default): the checkpoint's own dtype on an accelerator (bf16 for the release), float32
  on a CPU (bf16 matmuls are slow on CPUs without AMX; see docs/design notes).
- Weights go straight to their device through a device map (`{"": device}`), so no full-precision
  copy of the model is ever built in host memory. `--device-map auto` (with `--max-memory`) lets
  accelerate split the layers over several GPUs and offload the rest to CPU RAM.
- `--quantize int8|nf4|fp8` (`dg_edit.quantize`).
- Before a byte is read, the memory plan (`dg_edit.plan.check_fits`) refuses a model that cannot fit.

`pretrained_kwargs` is the one place the `from_pretrained` keyword arguments are built: tensor and
expert parallel loading (`tp_plan`, expert parallel) add their keys there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from . import quantize as q

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
DEVICE_MAPS = (None, "auto")


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model; the CLI's shared model arguments fill it (`dg_edit.startup.load_options`)."""

    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | torch.dtype | None = "auto"
    quantize: str = "none"
    device_map: str | None = None  # None: the whole model on `device`; "auto": accelerate spreads it
    max_memory: Mapping[Any, str] | None = None  # accelerate's budget per device, e.g. {0: "20GiB", "cpu": "64GiB"}
    # (mode, world size) under torchrun (dg_edit.distributed): this rank loads its tp/ep shard, placed by
    # transformers on cuda:LOCAL_RANK or the CPU
    parallel: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantize", q.check_choice(self.quantize))
        if self.device_map not in DEVICE_MAPS:
            raise ValueError(f"unknown --device-map {self.device_map!r}; use auto (or leave it out)")
        if self.max_memory and self.device_map != "auto":
            raise ValueError("--max-memory needs --device-map auto (it is accelerate's budget per device)")
        if self.parallel:
            if self.device not in (None, "", "auto"):
                raise ValueError("--device does not apply under --parallel: each rank uses its own accelerator "
                                 "(cuda:LOCAL_RANK) or the CPU; hide GPUs with CUDA_VISIBLE_DEVICES= to run on CPUs")
            if self.device_map is not None:
                raise ValueError("--device-map does not combine with --parallel: transformers places a sharded "
                                 "model itself (split layers over GPUs with --device-map auto in one process)")
            if self.quantize != "none":
                raise ValueError("--quantize does not combine with --parallel in this release (untested)")


def resolve_device(device: str | None) -> str:
    """The device a model loads on: the one asked for, else cuda when there is one, else cpu."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch has no CUDA device (torch {torch.__version__})")
    return str(dev)


def resolve_dtype(dtype: str | torch.dtype | None, device: str, checkpoint: torch.dtype) -> torch.dtype:
    """`auto` (or None): `checkpoint` on an accelerator, float32 on a CPU; otherwise the named dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.float32 if torch.device(device).type == "cpu" else checkpoint
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


def parse_max_memory(text: str | None) -> dict[Any, str] | None:
    """'0=20GiB,1=20GiB,cpu=64GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '64GiB'} (accelerate's form)."""
    from .plan import parse_size

    if not text:
        return None
    out: dict[Any, str] = {}
    for part in text.split(","):
        key, sep, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not key or not size:
            raise ValueError(f"--max-memory takes DEVICE=SIZE[,DEVICE=SIZE...], e.g. 0=20GiB,cpu=64GiB; got {text!r}")
        parse_size(size)  # a clear error for a bad size now, not from accelerate later
        key = key.removeprefix("cuda:")
        out[int(key) if key.isdigit() else key] = size
    return out


def pretrained_kwargs(options: LoadOptions, *, device: str, dtype: torch.dtype,
                      path: str | Path | None = None) -> dict[str, Any]:
    """The keyword arguments of `from_pretrained` for these options: THE one place they are built."""
    from . import hf_adapter as hf

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if options.parallel:  # this rank's shard; transformers places it (no device map, no quantization)
        kwargs.update(hf.parallel_load_kwargs(path, *options.parallel))
        return kwargs
    if options.device_map == "auto":
        kwargs["device_map"] = "auto"
        if options.max_memory:
            kwargs["max_memory"] = dict(options.max_memory)
    elif q.stages_on_host(options.quantize, device):
        kwargs["device_map"] = {"": "cpu"}  # nf4: read into RAM, experts quantized onto `device` (after_load)
    else:
        kwargs["device_map"] = {"": device}  # every tensor straight to its device as it is read
    config = q.quantization_config(options.quantize, dtype)
    if config is not None:
        kwargs["quantization_config"] = config
        method = q.METHODS[options.quantize]
        if method.experts_implementation:
            kwargs["experts_implementation"] = method.experts_implementation
    return kwargs


def load_model(path: str | Path, options: LoadOptions, *, prefix_tokens: int = 2048, cache_bytes: int | None = None):
    """(model, tokenizer) for a checked model directory; refuses a model that cannot fit first."""
    from . import hf_adapter as hf
    from .plan import check_fits, checkpoint_dtype, load_config

    transformers = hf.api()
    device = resolve_device(options.device)
    q.check_available(options.quantize)  # a missing library: one line naming the pip command
    config = load_config(path)
    dtype = resolve_dtype(options.dtype, device, checkpoint_dtype(config))
    if not options.parallel:  # the plan is for one process holding the whole model
        check_fits(config, name=str(path), dtype=dtype, quantize=options.quantize, device=device,
                   prefix_tokens=prefix_tokens, max_memory=dict(options.max_memory or {}) or None,
                   device_map=options.device_map, cache_bytes=cache_bytes)
    kwargs = pretrained_kwargs(options, device=device, dtype=dtype, path=path)
    try:
        model = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load model from {path}: {e}") from None
    q.after_load(options.quantize, model, device)
    model.eval()
    return model, tokenizer
