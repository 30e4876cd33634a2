"""Weight quantization for DiffusionGemma: the one module that talks to the quantization libraries.

What was found (transformers 5.24, torchao 0.18, bitsandbytes 0.50, optimum-quanto 0.2.7; README,
"Quantization"):

- Every transformers quantizer, left to its defaults, skips *every tied weight*
  (`get_keys_to_not_convert`), and DiffusionGemma ties every text-layer weight of its encoder to
  the decoder's. So a default `BitsAndBytesConfig`/`TorchAoConfig`/`QuantoConfig` load quantizes
  the vision tower and nothing else: the whole language model stays in bf16. An explicit
  `modules_to_not_convert` list (`SKIP_MODULES`) turns that default off.
- The 128 experts per layer are 3-D `nn.Parameter`s (`experts.gate_up_proj`, `experts.down_proj`),
  22.8B of the 25.2B text parameters. bitsandbytes' and quanto's transformers integrations swap
  `nn.Linear` modules only and pass over them. torchao does reach them: `TorchAoConfig` with an
  `FqnToConfig` naming the parameters quantizes them while they load (int8 and float8 weight-only
  run on a CPU; its 4-bit formats need CUDA kernels (mslk) that PyPI does not carry).
  transformers' `FineGrainedFP8Config` replaces each `*.experts` module with `FP8Experts`
  (on-the-fly quantization needs a GPU of compute capability 8.9+).
- So: `int8` and `fp8` are torchao weight-only (every text `nn.Linear` and the experts); `nf4`
  is bitsandbytes NF4 for the `nn.Linear`s through `BitsAndBytesConfig`, plus bitsandbytes'
  own parameter quantizer (`replace_parameter_4bit`) for the experts right after loading.

Each method names its pip command; a missing library is one line (`QuantizationUnavailable`).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch

from . import hf_adapter as hf

QUANTIZE_CHOICES = ("none", "int8", "nf4", "fp8")
# Kept in the load dtype by every method: the tied embedding/LM head (logit precision), the router
# (tiny, and its top-8 choice is sensitive), and the vision tower (never run by dg-edit). Matched as
# transformers' `should_convert_module` does: a prefix up to a module boundary, or a suffix.
SKIP_MODULES = ("lm_head", "router.proj", "model.encoder.vision_tower", "model.encoder.embed_vision")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
# text nn.Linear modules, never the experts' `down_proj` parameter (torchao would quantize it twice)
LINEAR_PATTERN = r"re:(?!.*experts).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class QuantizationUnavailable(ValueError):
    """The chosen --quantize needs a library (or a device) this machine does not have."""


@dataclass(frozen=True)
class Method:
    name: str
    library: str  # import name
    pip: str  # the one command that installs it
    summary: str
    # storage, for the memory plan: bytes per quantized element, and per row (scales, zero points)
    bytes_per_element: float
    bytes_per_row: float
    bytes_per_block: float = 0.0  # per `block` elements (bitsandbytes absmax)
    block: int = 0
    experts_implementation: str | None = None  # transformers' experts forward this storage needs


METHODS: dict[str, Method] = {
    "int8": Method("int8", "torchao", "pip install 'dg-edit[quant]'  (torchao)",
                   "torchao int8 weight-only (per-row scale): text nn.Linear layers and the 3-D experts",
                   1.0, 5.0,  # int8 data; float32 scale + int8 zero point per row
                   # torchao's Int8Tensor supports select (the eager per-expert loop), not bmm/transpose
                   experts_implementation="eager"),
    "fp8": Method("fp8", "torchao", "pip install 'dg-edit[quant]'  (torchao)",
                  "torchao float8 (e4m3) weight-only (per-row scale): text nn.Linear layers and the 3-D experts",
                  1.0, 4.0),
    "nf4": Method("nf4", "bitsandbytes", "pip install 'dg-edit[quant]'  (bitsandbytes)",
                  "bitsandbytes NF4 (blocks of 64): text nn.Linear layers through BitsAndBytesConfig, the 3-D "
                  "experts through bitsandbytes' parameter quantizer",
                  0.5, 0.0, bytes_per_block=4.0, block=64,
                  # the expert parameters dequantize on access: once per layer (grouped_mm), not per expert
                  experts_implementation="grouped_mm"),
}


# Methods whose 3-D experts are quantized after `from_pretrained` (no transformers quantizer reaches them
# while loading): the plan counts them at the load dtype until then.
QUANTIZED_AFTER_LOAD = ("nf4",)


def stages_on_host(name: str, device: str) -> bool:
    """True when a load reads the model into host RAM first: nf4 on an accelerator, so that the experts
    reach the device one quantized tensor at a time instead of all in bf16 (45.7 GB for the 26B model)."""
    return name in QUANTIZED_AFTER_LOAD and torch.device(device).type != "cpu"


def check_choice(name: str | None) -> str:
    """The normalized method name; a one-line `ValueError` for anything else."""
    name = "none" if name in (None, "") else str(name).lower()
    if name not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown --quantize {name!r}; use one of {', '.join(QUANTIZE_CHOICES)}")
    return name


def check_available(name: str) -> Method | None:
    """The `Method` for `name` (None for "none"), or `QuantizationUnavailable` naming the pip command."""
    name = check_choice(name)
    if name == "none":
        return None
    method = METHODS[name]
    if importlib.util.find_spec(method.library) is None:
        raise QuantizationUnavailable(f"--quantize {name} needs {method.library}, which is not installed; "
                                      f"run: {method.pip}")
    return method


def quantized_bytes(name: str, shape: tuple[int, ...]) -> float:
    """Bytes a weight of `shape` takes when quantized with method `name` (data plus scales)."""
    method = METHODS[name]
    numel = 1
    for n in shape:
        numel *= n
    rows = numel // shape[-1] if shape else 0
    blocks = -(-numel // method.block) if method.block else 0
    return numel * method.bytes_per_element + rows * method.bytes_per_row + blocks * method.bytes_per_block


def is_skipped(module_name: str) -> bool:
    """True when `module_name` is kept unquantized (see SKIP_MODULES)."""
    for key in SKIP_MODULES:
        if module_name == key or module_name.startswith(key + ".") or module_name.endswith(key):
            return True
    return False


def quantization_config(name: str, dtype: torch.dtype):
    """The transformers quantization config for `name` (None for "none"); the library must be installed."""
    method = check_available(name)
    if method is None:
        return None
    transformers = hf.api()
    if name == "nf4":
        # On a CPU, bitsandbytes warns on first use that an optional faster kernel (a download from a
        # model hub, which dg-edit never reaches) is missing; its own kernel runs instead.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
            llm_int8_skip_modules=list(SKIP_MODULES))
    from torchao.quantization import Float8WeightOnlyConfig, FqnToConfig, Int8WeightOnlyConfig

    per_weight = Int8WeightOnlyConfig() if name == "int8" else Float8WeightOnlyConfig()
    # The first pattern reaches the 3-D experts (parameters), the second every text nn.Linear (modules:
    # attention, dense MLP, self-conditioning); the skip list keeps the rest.
    fqn = FqnToConfig({r"re:.*\.experts\.(gate_up_proj|down_proj)": per_weight, LINEAR_PATTERN: per_weight})
    return transformers.TorchAoConfig(fqn, modules_to_not_convert=list(SKIP_MODULES))


def after_load(name: str, model, device: str) -> None:
    """Finish what the transformers config cannot do; for nf4, quantize the 3-D experts on `device`.

    When the load was staged in host RAM (`stages_on_host`), each expert tensor goes to `device` alone,
    is quantized there, and only then does the rest of the model follow.
    """
    if name not in QUANTIZED_AFTER_LOAD:
        return
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    target = torch.device(device)
    for _, decoder_layer in hf.paired_text_layers(model):
        experts = decoder_layer.experts
        for param in EXPERT_PARAMS:
            weight = getattr(experts, param)
            if weight.device != target:
                setattr(experts, param, torch.nn.Parameter(weight.data.to(target), requires_grad=False))
            del weight
            replace_parameter_4bit(experts, param, quant_type="nf4", blocksize=METHODS["nf4"].block)
    share_layers(model, experts_only=True)
    if stages_on_host(name, device):
        model.to(target)  # the nn.Linear layers (already 4-bit), embeddings and norms
    if target.type == "cuda":
        torch.cuda.empty_cache()


def quantize_in_place(name: str, model) -> None:
    """Quantize a model that is already in memory, the same weights as a load would (bench/gpu.py
    builds the 26B shape with random weights: there is no checkpoint to load through a config).

    torchao's `quantize_` for int8/fp8; for nf4 bitsandbytes' parameter quantizer on the same
    nn.Linear weights `BitsAndBytesConfig` would swap for Linear4bit, and on the experts. The
    decoder's layers are quantized and the encoder's are given the same modules (`share_layers`).
    """
    method = check_available(name)
    if method is None:
        return
    decoder = hf.decoder_module(model)
    if name == "nf4":
        from bitsandbytes.nn.parametrize import replace_parameter_4bit

        for module_name, module in list(decoder.named_modules()):
            if is_skipped(module_name):
                continue
            if module_name.endswith("experts"):
                params = EXPERT_PARAMS
            elif isinstance(module, torch.nn.Linear):
                params = ("weight",)
            else:
                continue
            for param in params:
                replace_parameter_4bit(module, param, quant_type="nf4", blocksize=method.block)
    else:
        from torchao.quantization import quantize_

        config = quantization_config(name, hf.embedding_dtype(model)).quant_type
        quantize_(decoder, config, filter_fn=None)
    if method.experts_implementation:
        hf.set_experts_implementation(model, method.experts_implementation)
    share_layers(model, experts_only=False)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def share_layers(model, experts_only: bool) -> None:
    """Give each encoder layer its decoder layer's (quantized) experts and, unless `experts_only`,
    nn.Linear modules: the two share every weight (tied), and must keep sharing one quantized copy."""
    for encoder_layer, decoder_layer in hf.paired_text_layers(model):
        if encoder_layer is None:
            continue
        for module_name, module in list(decoder_layer.named_modules()):
            if module_name == "experts" or (not experts_only and isinstance(module, torch.nn.Linear)
                                            and not is_skipped(module_name)):
                encoder_layer.set_submodule(module_name, module)


def storage_bytes(model) -> tuple[int, int]:
    """(all parameters, the experts' parameters) in bytes as stored: tensor subclasses (torchao) count
    their inner tensors, parametrized weights (bitsandbytes experts) their quantized original."""
    seen: set[int] = set()
    total = experts = 0
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            nbytes = _tensor_bytes(param)
            total += nbytes
            if ".experts" in module_name:
                experts += nbytes
        state = getattr(module, "quant_state", None)  # a bitsandbytes parametrization keeps its absmax here
        if state is not None and hasattr(state, "absmax") and id(state) not in seen:
            seen.add(id(state))
            nbytes = int(state.absmax.numel() * state.absmax.element_size())
            total += nbytes
            experts += nbytes if ".experts" in module_name else 0
    return total, experts


def _tensor_bytes(t) -> int:
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    flatten = getattr(type(data), "__tensor_flatten__", None)
    if flatten is not None and type(data) is not torch.Tensor:
        names, _ = data.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(data, n)) for n in names)
    state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit: its absmax lives here
    extra = int(state.absmax.numel() * state.absmax.element_size()) if state is not None else 0
    return data.numel() * data.element_size() + extra


def describe(name: str) -> dict[str, Any]:
    """Library, pip command and what it quantizes, for `dg-edit plan` and error messages."""
    if name == "none":
        return {"method": "none"}
    m = METHODS[name]
    return {"method": name, "library": m.library, "install": m.pip, "what": m.summary}
