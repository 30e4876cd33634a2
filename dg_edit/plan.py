"""Memory plan: will this DiffusionGemma fit, before a byte of its weights is read?

`dg-edit plan MODEL_DIR_OR_CONFIG` builds the model from `config.json` on the meta device (no
weights, no memory) and adds up:

- weights: every parameter once (the encoder and decoder share theirs), at the load dtype, or at
  the quantized storage of `--quantize` for the parameters that method quantizes (`dg_edit.quantize`);
- the encoder KV cache of the prefix: `kv_bytes_per_token` per token (sliding-window layers stop
  at their window), repeated for each candidate row, plus the document's prefix cache, which keeps
  every layer's full states;
- one denoising step for a canvas of L slots x B rows (`step_bytes`): the vocabulary-wide tensors
  ([B, L, V] logits, the previous step's self-conditioning logits and the decoder's own
  temporaries around them) plus activations;
- a margin (runtime, allocator fragmentation).

The same plan runs in `Engine.load` (`check_fits`), so `lsp`, `serve`, `tui` and `infill` refuse a
model that cannot fit with the same figures and the options that would.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import hf_adapter as hf, quantize as q
from .config import Settings

DEFAULT_ROWS = 4  # candidate rows of one step (the "4 rows x 256 slots")
MAX_AUTO_ROWS = 256  # Settings.batch_rows = 0 admits as many canvas rows as fit, up to this many
MARGIN_FRACTION = 0.05  # of the total: allocator fragmentation
MARGIN_FIXED_CUDA = 1 << 30  # CUDA context, kernels and workspace
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


class ModelDoesNotFit(ValueError):
    """The plan says the model cannot fit on the chosen device; the message has the figures and options."""

    def __init__(self, message: str, plan: "Plan"):
        super().__init__(message)
        self.plan = plan


# ------------------------------------------------------------------ config
def load_config(source: str | Path):
    """A DiffusionGemma config from a model directory or a config.json path (nothing else is read)."""
    path = Path(source).expanduser()
    directory = path if path.is_dir() else path.parent
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    if not path.exists():
        raise FileNotFoundError(f"model directory or config.json not found: {path}")
    if not path.is_dir():
        hf.check_model_type_file(path)
        return hf.config_from_json(path)
    hf.check_model_type(directory)
    return hf.config_from_json(directory / "config.json")


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the checkpoint's config.json names (bf16 for the release), float32 if it names none."""
    text = config.get_text_config()
    for c in (config, text):
        d = getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)
        if isinstance(d, torch.dtype):
            return d
        if isinstance(d, str) and hasattr(torch, d):
            return getattr(torch, d)
    return torch.float32


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------ KV cache
def _layer_kv_shapes(config) -> list[tuple[int, int, bool]]:
    """(kv heads, head dim, sliding) for each text layer, as the attention modules build them."""
    text = config.get_text_config(decoder=True)
    return [(heads, head_dim, layer_type == "sliding_attention")
            for (heads, head_dim), layer_type in zip(hf.layer_kv_shapes(text), text.layer_types)]


def kv_bytes_per_token(config, dtype: torch.dtype | int = torch.bfloat16) -> int:
    """Bytes of encoder K and V one prefix token adds, over all layers (before any window applies).

    This is the per-token price of a document cache (`dg_edit.prefix_cache` keeps every layer's
    states at every position: a request at any cursor needs the window before *that* cursor) and,
    below the sliding window, of the encoder cache itself. `config`: a model or text config; `dtype`:
    the cache's dtype or its size in bytes. 26B-A4B in bf16: 225,280 bytes (25 sliding layers x 2 x 8
    heads x 256 + 5 full layers x 2 x 2 heads x 512, two bytes each).
    """
    size = dtype if isinstance(dtype, int) else element_size(dtype)
    return sum(2 * heads * head_dim * size for heads, head_dim, _ in _layer_kv_shapes(config))


def kv_bytes(config, dtype: torch.dtype, tokens: int, windowed: bool = True) -> int:
    """Bytes of an encoder cache holding `tokens` prefix tokens; `windowed`: sliding layers keep only
    their last `sliding_window - 1` states, as a `DynamicCache` after encoding does."""
    text = config.get_text_config(decoder=True)
    window = max(int(text.sliding_window) - 1, 0)
    size = element_size(dtype)
    total = 0
    for heads, head_dim, sliding in _layer_kv_shapes(config):
        kept = min(tokens, window) if (windowed and sliding) else tokens
        total += 2 * heads * head_dim * size * kept
    return total


# ------------------------------------------------------------------ weights
@dataclass
class WeightBytes:
    total: int
    parameters: int
    experts_parameters: int
    experts_bytes: int
    quantized_parameters: int  # parameters stored quantized
    kept_parameters: int  # parameters left in the load dtype
    load_peak: int  # device bytes while loading (nf4 quantizes the experts after reading them)
    host_staging: int  # host bytes while loading (nf4 on an accelerator stages the model in RAM), else 0


def meta_model(config):
    """The model built on the meta device: shapes and tying only, no memory."""
    with torch.device("meta"):
        return hf.api().DiffusionGemmaForBlockDiffusion(config)


def weight_bytes(config, dtype: torch.dtype, quantize: str = "none", model=None, device: str = "cpu") -> WeightBytes:
    """Bytes of every distinct parameter at `dtype`, or quantized where `quantize` quantizes it; and
    the peaks while loading on `device` (see `dg_edit.quantize.stages_on_host`)."""
    quantize = q.check_choice(quantize)
    model = meta_model(config) if model is None else model
    size = element_size(dtype)
    seen: set[int] = set()
    total = params = experts_params = experts_bytes = quantized = largest_expert = 0
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            numel = param.numel()
            params += numel
            is_expert = module_name.endswith(".experts") and param_name in q.EXPERT_PARAMS
            is_linear = isinstance(module, torch.nn.Linear) and param_name == "weight"
            if quantize != "none" and (is_expert or is_linear) and not q.is_skipped(module_name):
                nbytes = q.quantized_bytes(quantize, tuple(param.shape))
                quantized += numel
            else:
                nbytes = numel * size
            total += nbytes
            if is_expert:
                experts_params += numel
                experts_bytes += nbytes
                largest_expert = max(largest_expert, numel * size)
    load_peak, host = total, 0
    if quantize in q.QUANTIZED_AFTER_LOAD:
        read = total - experts_bytes + experts_params * size  # the experts as read, before quantizing
        if q.stages_on_host(quantize, device):
            load_peak, host = total + largest_expert, read  # one expert tensor at a time goes to the device
        else:
            load_peak = read
    return WeightBytes(total=int(total), parameters=params, experts_parameters=experts_params,
                       experts_bytes=int(experts_bytes), quantized_parameters=quantized,
                       kept_parameters=params - quantized, load_peak=int(load_peak), host_staging=int(host))


# ------------------------------------------------------------------ one denoising step
def step_bytes(config, dtype: torch.dtype, slots: int, rows: int, prefix_tokens: int) -> dict[str, int]:
    """Peak bytes of one denoising step beyond weights and caches, for `rows` x `slots` canvases.

    Vocabulary-wide part, per element of [B, L, V]: the previous step's self-conditioning logits (load
    dtype, held through the forward), and the decoder's own temporaries at the peak of its forward,
    which ends with float32 logits, then a soft-cap (logits / c, tanh, * c, each a new float32
    tensor: two live at a time). The engine's sampling after the forward works in place and in row
    chunks (measured in bench/memory.py), so the forward's peak is the step's. Activations: hidden
    states, the expert and MLP intermediates and, as an upper bound, attention scores over prefix
    and canvas (fused attention kernels on a GPU do not materialize them).
    """
    text = config.get_text_config(decoder=True)
    size = element_size(dtype)
    elements = rows * slots * text.vocab_size
    vocab = elements * (size + 8 + (size if size != 4 else 0))
    hidden = rows * slots * text.hidden_size * size * 8
    experts = rows * slots * text.top_k_experts * 3 * text.moe_intermediate_size * size
    mlp = rows * slots * 3 * text.intermediate_size * size
    scores = rows * text.num_attention_heads * slots * (prefix_tokens + slots) * 4
    return {"vocab": vocab, "activations": hidden + experts + mlp + scores, "total": vocab + hidden + experts + mlp + scores}


def row_bytes(config, dtype: torch.dtype, slots: int, prefix_tokens: int) -> int:
    """What one more canvas row costs in a batched step (dg_edit/scheduler.py): its share of the step
    (`step_bytes`), its encoder cache twice (its own, repeated per candidate row, and its copy in the
    stacked batch cache), and one more [L, V] element per slot for the stacked self-conditioning logits."""
    text = config.get_text_config(decoder=True)
    return (step_bytes(config, dtype, slots, 1, prefix_tokens)["total"] + 2 * kv_bytes(config, dtype, prefix_tokens)
            + slots * text.vocab_size * element_size(dtype))


def rows_that_fit(config, dtype: torch.dtype, slots: int, prefix_tokens: int, free_bytes: int, device: str) -> int:
    """Canvas rows of `slots` slots (each over a `prefix_tokens` prefix) that fit in `free_bytes` beside
    what is already counted, keeping the plan's margin."""
    usable = free_bytes - _margin(0, device)
    return max(0, int(usable / (row_bytes(config, dtype, slots, prefix_tokens) * (1 + MARGIN_FRACTION))))


# ------------------------------------------------------------------ the plan
@dataclass
class Plan:
    model: str
    dtype: str
    quantize: str
    device: str
    slots: int
    rows: int
    prefix_tokens: int
    parameters: int
    experts_parameters: int
    weights_bytes: int
    experts_bytes: int
    quantized_parameters: int
    kv_bytes_per_token: int
    kv_bytes_per_1k_tokens: int
    kv_request_bytes: int  # the prefix's encoder cache, once per candidate row
    kv_session_bytes: int  # the document caches: up to Settings.cache_budget_mb, all documents together
    step_bytes: int
    margin_bytes: int
    total_bytes: int  # serving: weights, KV caches, one step, margin
    load_peak_bytes: int  # loading: weights as they are read (see WeightBytes.load_peak), margin
    host_staging_bytes: int  # host RAM a load stages the model in (nf4 on an accelerator), else 0
    budget_bytes: int | None
    budget_source: str
    fits: bool | None
    quantization: dict[str, Any] = field(default_factory=dict)
    options_that_fit: list[str] = field(default_factory=list)
    batch_rows_fit: int | None = None  # canvas rows of all requests' steps together that fit (Settings.batch_rows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        gb = _gb
        lines = [
            f"model          {self.model}",
            f"load as        {self.dtype}" + (f", quantized {self.quantize} ({self.quantization.get('what', '')})"
                                              if self.quantize != "none" else ""),
            f"parameters     {self.parameters / 1e9:.2f}B ({self.experts_parameters / 1e9:.2f}B in the experts)",
            f"weights        {gb(self.weights_bytes)}  (experts {gb(self.experts_bytes)}"
            + (f"; {self.quantized_parameters / 1e9:.2f}B parameters quantized)" if self.quantize != "none" else ")"),
            f"KV cache       {gb(self.kv_bytes_per_1k_tokens)} per 1,000 prefix tokens "
            f"({self.kv_bytes_per_token:,} bytes per token)",
            f"  this request {gb(self.kv_request_bytes)} ({self.prefix_tokens:,}-token prefix x {self.rows} rows) "
            f"+ {gb(self.kv_session_bytes)} document caches (cache_budget_mb)",
            f"one step       {gb(self.step_bytes)} ({self.slots} slots x {self.rows} rows)",
            f"margin         {gb(self.margin_bytes)}",
            f"total          {gb(self.total_bytes)}",
        ]
        if self.load_peak_bytes > self.total_bytes:
            lines.append(f"load peak      {gb(self.load_peak_bytes)} (the experts are read at {self.dtype}, then "
                         f"quantized to {self.quantize} layer by layer)")
        if self.host_staging_bytes:
            lines.append(f"host RAM       {gb(self.host_staging_bytes)} while loading (the model is read into RAM, "
                         f"each expert tensor quantized on {self.device}, then the rest moved there)")
        if self.budget_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"on {self.device:11} {verdict} in {gb(self.budget_bytes)} ({self.budget_source})")
        if self.batch_rows_fit is not None and self.fits:
            lines.append(f"batching       {self.batch_rows_fit:,} canvas rows of {self.slots} slots fit in one step "
                         f"beside the weights and caches ({gb(self.budget_bytes - self.total_bytes)} left over; "
                         "Settings.batch_rows, 0 = as many as fit)")
        if self.options_that_fit and not self.fits:
            lines.append("options that fit: " + "; ".join(self.options_that_fit))
        return "\n".join(lines) + "\n"


def make_plan(config, *, name: str = "", dtype: torch.dtype, quantize: str = "none", device: str = "cuda",
              slots: int | None = None, rows: int = DEFAULT_ROWS, prefix_tokens: int = 2048,
              budget_bytes: int | None = None, budget_source: str = "", model=None,
              with_options: bool = True, cache_bytes: int | None = None) -> Plan:
    """The plan for one configuration; `budget_bytes` (None = unknown) decides `fits`.

    `cache_bytes`: what the engine's document caches may hold (`Settings.cache_budget_mb`, the
    default's when None): every document's encoder states, within that budget (`dg_edit.prefix_cache`).
    """
    quantize = q.check_choice(quantize)
    slots = int(slots or getattr(config, "canvas_length", None) or 256)
    model = meta_model(config) if model is None else model
    weights = weight_bytes(config, dtype, quantize, model=model, device=device)
    kv_dtype = dtype  # the cache holds activations in the compute dtype, quantized or not
    kv_token = kv_bytes_per_token(config, kv_dtype)
    kv_request = kv_bytes(config, kv_dtype, prefix_tokens) * rows
    kv_session = (Settings().cache_budget_mb << 20) if cache_bytes is None else cache_bytes
    step = step_bytes(config, dtype, slots, rows, prefix_tokens)["total"]
    subtotal = weights.total + kv_request + kv_session + step
    margin = _margin(subtotal, device)
    total = subtotal + margin
    load_peak = weights.load_peak + _margin(weights.load_peak, device)
    fits = None if budget_bytes is None else max(total, load_peak) <= budget_bytes
    plan = Plan(model=name, dtype=str(dtype).replace("torch.", ""), quantize=quantize, device=device, slots=slots,
                rows=rows, prefix_tokens=prefix_tokens, parameters=weights.parameters,
                experts_parameters=weights.experts_parameters, weights_bytes=weights.total,
                experts_bytes=weights.experts_bytes, quantized_parameters=weights.quantized_parameters,
                kv_bytes_per_token=kv_token, kv_bytes_per_1k_tokens=kv_token * 1000, kv_request_bytes=kv_request,
                kv_session_bytes=kv_session, step_bytes=step, margin_bytes=margin, total_bytes=total,
                load_peak_bytes=load_peak, host_staging_bytes=weights.host_staging,
                budget_bytes=budget_bytes, budget_source=budget_source, fits=fits,
                quantization=q.describe(quantize))
    if budget_bytes is not None:
        # The plan counted `rows` rows of one step; what is left holds more rows of other requests' steps.
        plan.batch_rows_fit = rows + rows_that_fit(config, dtype, slots, prefix_tokens, budget_bytes - total, device)
    if with_options and fits is False:
        plan.options_that_fit = _options_that_fit(config, plan, model)
    return plan


def _margin(nbytes: int, device: str) -> int:
    """What to keep free beyond `nbytes`: allocator fragmentation, and on CUDA the context and kernels."""
    return int(nbytes * MARGIN_FRACTION) + (MARGIN_FIXED_CUDA if device.startswith("cuda") else 0)


def _options_that_fit(config, plan: Plan, model) -> list[str]:
    """Cheaper ways to run the same model on the same budget: another quantization and/or bf16, or offload."""
    options = []
    dtype = getattr(torch, plan.dtype)
    dtypes = [(dtype, "")] + ([(torch.bfloat16, "--dtype bfloat16")] if dtype == torch.float32 else [])
    for other_dtype, dtype_flag in dtypes:
        for method in q.QUANTIZE_CHOICES:
            if method == plan.quantize and other_dtype == dtype:
                continue
            other = make_plan(config, dtype=other_dtype, quantize=method, device=plan.device, slots=plan.slots,
                              rows=plan.rows, prefix_tokens=plan.prefix_tokens, budget_bytes=plan.budget_bytes,
                              model=model, with_options=False, cache_bytes=plan.kv_session_bytes)
            if other.fits:
                flags = " ".join(f for f in (dtype_flag, f"--quantize {method}" if method != plan.quantize else "")
                                 if f)
                options.append(f"{flags} (needs {_gb(max(other.total_bytes, other.load_peak_bytes))})")
    if plan.device.startswith("cuda") and plan.budget_bytes is not None:
        over = max(plan.total_bytes, plan.load_peak_bytes) - plan.budget_bytes
        options.append(f"--device-map auto (accelerate offloads about {_gb(over)} of weights to CPU RAM; "
                       "slower: those layers cross PCIe every step)")
    return options


# ------------------------------------------------------------------ memory on the device
def parse_size(text: str) -> int:
    """'80GB', '24GiB', '512MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 80GB, 24GiB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def host_available() -> int:
    """Host memory the kernel says can be allocated without swapping (MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def device_budget(device: str, max_memory: dict | None = None, device_map: str | None = None) -> tuple[int, str]:
    """(bytes, how they were found) that the model may use on `device` (all devices with a device map)."""
    if max_memory:
        return sum(parse_size(v) if not isinstance(v, int) else v for v in max_memory.values()), "--max-memory"
    dev = torch.device(device)
    if dev.type == "cuda":
        if device_map == "auto":
            free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
            return free + host_available(), "free memory of every GPU plus available host RAM"
        free, _ = torch.cuda.mem_get_info(dev)
        return free, f"free memory of {dev}"
    return host_available(), "available host RAM"


def check_fits(config, *, name: str, dtype: torch.dtype, quantize: str, device: str, prefix_tokens: int,
               max_memory: dict | None = None, device_map: str | None = None, cache_bytes: int | None = None) -> Plan:
    """The plan for a load; raises `ModelDoesNotFit` (with the figures and the options) when it cannot fit."""
    budget, source = device_budget(device, max_memory, device_map)
    plan = make_plan(config, name=name, dtype=dtype, quantize=quantize, device=device,
                     prefix_tokens=prefix_tokens, budget_bytes=budget, budget_source=source, cache_bytes=cache_bytes)
    if plan.host_staging_bytes and plan.host_staging_bytes > host_available():
        raise ModelDoesNotFit(
            f"{name} with --quantize {quantize} on {device} is read into host RAM first "
            f"({_gb(plan.host_staging_bytes)}) and {_gb(host_available())} is available. Options: "
            "--quantize int8 or fp8 (quantized as they are read, straight on the device). See: dg-edit plan "
            f"{name} --quantize {quantize}", plan)
    if plan.fits is False:
        options = "; ".join(plan.options_that_fit) or "none on this device"
        raise ModelDoesNotFit(
            f"{name} does not fit on {device}: it needs {_gb(max(plan.total_bytes, plan.load_peak_bytes))} "
            f"({'to load; ' if plan.load_peak_bytes > plan.total_bytes else ''}weights {_gb(plan.weights_bytes)} "
            f"{plan.dtype}{'' if quantize == 'none' else ' quantized ' + quantize}, KV cache "
            f"{_gb(plan.kv_request_bytes + plan.kv_session_bytes)} for a {prefix_tokens:,}-token prefix, one step "
            f"{_gb(plan.step_bytes)} for {plan.slots} slots x {plan.rows} rows, margin {_gb(plan.margin_bytes)}) "
            f"and {_gb(budget)} is available ({source}). Options that fit: {options}. "
            f"See: dg-edit plan {name}", plan)
    return plan


def _gb(n: int | float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
