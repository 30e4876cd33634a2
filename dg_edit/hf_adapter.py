"""The one module that touches transformers' DiffusionGemma internals.

Why one module: transformers moves. 5.24 renamed `past_key_values` to `cache` across
`models/diffusion_gemma` (the `forward` methods keep a deprecated alias until 5.40; the static mask
builders and the generation output do not), and every fresh install broke while CI stayed green
on an old site-packages. Everything dg-edit needs below the public `from_pretrained`/`generate`
surface goes through the functions here: encoder forward into a cache, decoder forward over a
canvas, the encoder and decoder mask builders, cache creation, past recording and crop, batch
repeat, the embedding dtype, the LM head, and the tensor/expert-parallel plans `--parallel` loads
with (`corrected_plan` says why transformers' own plans fail for this model). Nothing else in the
project passes `past_key_values=` or `cache=` to transformers or reaches into `model.model.*`.

How it adapts: by what the installed code accepts (signatures, attributes), looked up once per
function and kept in `functools.cache`, never by comparing version strings. Each adaptation names
the release that changed it. The supported range itself lives in pyproject.toml (the installed
package's metadata); `check_transformers` reads it from there so the two cannot drift.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import torch

DIFFUSION_GEMMA_MODEL_TYPE = "diffusion_gemma"
# transformers resolves its names lazily (`_LazyModule`), and two threads importing from it at once
# can fail with "cannot import name 'AutoTokenizer'" (the language server preloads it in one thread
# while another loads the model). Every import of transformers in dg-edit goes through `api()`.
_IMPORT_LOCK = threading.Lock()


class UnsupportedTransformers(ValueError):
    """The installed transformers is outside the range dg-edit was tested on (a setup mistake: exit 2)."""


class NotDiffusionGemma(ValueError):
    """A model directory whose config.json is not a DiffusionGemma model."""


# ------------------------------------------------------------------ version and model checks
def supported_range(package: str = "transformers") -> str:
    """The version specifier dg-edit's installed metadata gives for `package` (e.g. ">=5.23,<5.25").

    Read from the installed distribution, which pyproject.toml generated, so the check below and the
    bounds pip enforces are one and the same. Empty when dg-edit runs from a tree that is not installed.
    """
    try:
        requires = metadata.requires("dg-edit") or []
    except metadata.PackageNotFoundError:
        return ""
    from packaging.requirements import Requirement

    for line in requires:
        req = Requirement(line)
        if req.name.lower() == package and req.marker is None:
            return str(req.specifier)
    return ""


# The opt-in for a transformers release newer than the tested range. An environment variable, not a
# flag, because it has to reach every entry point, the language server an editor starts included.
ALLOW_UNTESTED_ENV = "DG_EDIT_ALLOW_UNTESTED"


def check_transformers(environ: Mapping[str, str] = os.environ) -> str:
    """Raise `UnsupportedTransformers` with a one-line fix unless the installed release is supported.

    Runs before any model is loaded (and before transformers is imported), so a user outside the
    range sees which version is installed, which range is supported and the pip command that fixes it
    instead of a traceback from deep inside a forward pass. A release newer than the range (the upper
    bound exists because this module drives internals a release may change) runs anyway, with a
    warning, when `DG_EDIT_ALLOW_UNTESTED=1`: a user can try it before the next dg-edit widens the
    range. An older release never runs (DiffusionGemma arrived in 5.23). Returns the installed version.
    """
    try:
        installed = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        raise UnsupportedTransformers("transformers is not installed; run: pip install -e .") from None
    spec = supported_range()
    if spec:
        from packaging.specifiers import SpecifierSet

        specifiers = SpecifierSet(spec)
        if not specifiers.contains(installed, prereleases=True):
            newer = all(s.contains(installed, prereleases=True) for s in specifiers if s.operator not in ("<", "<="))
            if not newer:
                raise UnsupportedTransformers(
                    f"transformers {installed} is installed, but dg-edit supports transformers{spec}; "
                    f"run: pip install 'transformers{spec}'")
            if environ.get(ALLOW_UNTESTED_ENV) != "1":
                raise UnsupportedTransformers(
                    f"transformers {installed} is installed, newer than dg-edit's tested range transformers{spec}; "
                    f"run: pip install 'transformers{spec}', or set {ALLOW_UNTESTED_ENV}=1 to try it anyway")
            _warn_untested(installed, spec)
    return installed


@functools.cache
def _warn_untested(installed: str, spec: str) -> None:
    """Once per process (the CLI and the engine both check): the run is outside what CI has proven."""
    logging.getLogger(__name__).warning(
        "dg-edit: running on transformers %s, newer than the tested range transformers%s (%s=1); "
        "if it breaks, run: pip install 'transformers%s'", installed, spec, ALLOW_UNTESTED_ENV, spec)


def check_model_type(model_dir: str | Path) -> None:
    """Raise `NotDiffusionGemma` naming the `model_type` of a config.json that is not DiffusionGemma."""
    check_model_type_file(Path(model_dir) / "config.json")


def check_model_type_file(path: str | Path) -> None:
    """`check_model_type` for a config.json given by its own path."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise NotDiffusionGemma(f"{path} is not a readable JSON config: {e}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != DIFFUSION_GEMMA_MODEL_TYPE:
        raise NotDiffusionGemma(
            f"{path} has model_type {model_type!r}, not {DIFFUSION_GEMMA_MODEL_TYPE!r}: dg-edit runs "
            "DiffusionGemma checkpoints (DiffusionGemmaForBlockDiffusion) only")


# ------------------------------------------------------------------ imports
def api() -> ModuleType:
    """The `transformers` module with the names dg-edit uses resolved, imported under one lock."""
    with _IMPORT_LOCK:
        # With torchao installed (the quant extra), importing a model imports torchao, which warns on
        # stderr about CUDA-only extensions it cannot load on a CPU build; a CLI's stderr is for its
        # own messages. (transformers 5.23+ imports its torchao quantizer eagerly.)
        for noisy in ("torchao", "torch.utils._pytree"):
            logging.getLogger(noisy).setLevel(max(logging.getLogger(noisy).level, logging.ERROR))
        import transformers
        from transformers import (AutoConfig, AutoTokenizer, DiffusionGemmaConfig,  # noqa: F401
                                  DiffusionGemmaForBlockDiffusion, DynamicCache)
        from transformers import masking_utils  # noqa: F401
        from transformers.models.diffusion_gemma import modeling_diffusion_gemma  # noqa: F401
    return transformers


# ------------------------------------------------------------------ what the installed code accepts
@functools.cache
def _cache_kw(qualname: str) -> str:
    """The keyword a transformers callable takes for the encoder KV cache.

    transformers 5.24 renamed `past_key_values` to `cache` in models/diffusion_gemma (with a
    deprecated alias on the `forward` methods only). Looked up in the installed signature
    (`inspect.signature` follows the deprecation wrapper's `__wrapped__`).
    """
    m = api().models.diffusion_gemma.modeling_diffusion_gemma
    owner, _, name = qualname.partition(".")
    fn = getattr(getattr(m, owner), name)
    params = inspect.signature(fn).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise UnsupportedTransformers(f"{qualname} takes neither `cache` nor `past_key_values`: this transformers "
                                  "release changed DiffusionGemma's interface; see dg_edit/hf_adapter.py")


def _kw(qualname: str, cache) -> dict[str, Any]:
    return {_cache_kw(qualname): cache}


def hook_cache(kwargs: dict[str, Any]):
    """The cache a forward hook saw, whichever keyword the caller used (see `_cache_kw`)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def config_from_json(path: str | Path):
    """A `DiffusionGemmaConfig` from a config.json (the memory plan builds the model on meta from it)."""
    return api().DiffusionGemmaConfig.from_json_file(str(path))


# ------------------------------------------------------------------ modules and dtypes
def paired_text_layers(model) -> list[tuple[torch.nn.Module | None, torch.nn.Module]]:
    """(encoder layer, decoder layer) for each text layer; the two share every weight (tied)."""
    decoder_layers = list(model.model.decoder.layers)
    encoder = getattr(model.model.encoder, "language_model", None)
    encoder_layers = list(encoder.layers) if encoder is not None else [None] * len(decoder_layers)
    return list(zip(encoder_layers, decoder_layers))


def decoder_module(model) -> torch.nn.Module:
    """The decoder: its text layers own the weights the encoder's layers share (tied)."""
    return model.model.decoder


def set_experts_implementation(model, implementation: str) -> None:
    """Switch the MoE experts' forward ("eager", "grouped_mm", ...) of a model already built."""
    model.set_experts_implementation(implementation)


def model_from_config(config, dtype: torch.dtype, device: str | torch.device):
    """A randomly initialized model built directly on `device` in `dtype` (benchmarks: no checkpoint).

    `_from_config` is what `AutoModel.from_config` calls; DiffusionGemmaForBlockDiffusion has no
    Auto class for it. Under a device context the weights are allocated and initialized there.
    """
    with torch.device(device):
        return api().DiffusionGemmaForBlockDiffusion._from_config(config, dtype=dtype)


def is_quantized(model) -> bool:
    """True for a model with quantized weights: loaded with a transformers quantization config
    (`from_pretrained` sets `hf_quantizer`), or quantized in place (tensor subclasses, parametrized
    weights). Such weights fail under `torch.inference_mode`."""
    if getattr(model, "hf_quantizer", None) is not None:
        return True
    return any(type(p) is not torch.nn.Parameter or "parametrizations." in name
               for name, p in model.named_parameters())


def text_config(model):
    """The decoder-side text config, which sizes the KV cache."""
    return model.config.get_text_config(decoder=True)


def layer_kv_shapes(text_config) -> list[tuple[int, int]]:
    """(K/V heads, head dim) of every layer, from a DiffusionGemma text config.

    Full-attention layers differ from sliding ones (the 26B: 2 heads of 512 against 8 of 256). Since
    5.23 the config resolves that into `per_layer_config[i]` (from `global_head_dim` and
    `num_global_key_value_heads`); the attention layers read the same view.
    """
    per_layer = getattr(text_config, "per_layer_config", None)
    shapes = []
    for i in range(text_config.num_hidden_layers):
        layer = per_layer[i] if per_layer is not None else text_config
        shapes.append((int(layer.num_key_value_heads), int(layer.head_dim)))
    return shapes


def encoder_module(model) -> torch.nn.Module:
    """The encoder (for forward hooks: fault injection)."""
    return model.model.encoder


def embedding_dtype(model) -> torch.dtype:
    """The dtype self-conditioning logits must have: the decoder's embedding matrix's."""
    return model.model.decoder.embed_tokens.weight.dtype


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, V] float32
    """LM head plus the final logit soft-cap, as `DiffusionGemmaForBlockDiffusion.forward` applies them."""
    logits = model.lm_head(hidden).float()
    c = model.final_logit_softcapping
    return torch.tanh(logits / c) * c if c else logits


# ------------------------------------------------------------------ caches
def new_cache(model):
    """An empty encoder KV cache for `model` (a `DynamicCache` sized by the text config)."""
    return api().DynamicCache(config=text_config(model))


def cache_from_states(model, keys: list[torch.Tensor], values: list[torch.Tensor], length: int):
    """A cache holding the first `length` positions of full per-layer states (keys[i]: [1, H, T, D]).

    Sliding-window layers keep only their last `sliding_window - 1` states, as after a plain encoder
    pass, and their `cumulative_length` says how many positions came before.
    """
    cache = new_cache(model)
    for i, layer in enumerate(cache.layers):
        if length <= 0:
            continue
        k = keys[i][..., :length, :]
        v = values[i][..., :length, :]
        layer.lazy_initialization(k, v)
        if layer.is_sliding:
            layer.keys = k[..., -layer.sliding_window + 1 :, :]
            layer.values = v[..., -layer.sliding_window + 1 :, :]
            layer.cumulative_length = length
        else:
            layer.keys, layer.values = k, v
    return cache


def start_recording(cache) -> None:
    """Sliding layers keep every new state (not only their window) until `stop_recording`."""
    cache.activate_past_recording()


def layer_states(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer as the cache holds them now: [B, H, T, D] each."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def stop_recording(cache) -> None:
    """Back to a plain encoder cache: sliding layers trimmed to their window, recording off."""
    cache.crop(0)
    for layer in cache.layers:
        if layer.is_sliding:
            layer.record_past = False


def batch_repeat(cache, b: int) -> None:
    """Repeat a batch-1 cache `b` times along the batch, in place (the candidate rows)."""
    cache.batch_repeat_interleave(b)


# ------------------------------------------------------------------ forwards
def encoder_forward(model, cache, input_ids: torch.Tensor,  # [B, n]
                    position_ids: torch.Tensor,  # [B, n]
                    attention_mask: torch.Tensor | None = None,  # [B, past + n] bool, None = all real
                    **kwargs):
    """Run the encoder over `input_ids`, appending their states to `cache`; returns its output.

    The mask mapping is built with the encoder's own `create_masks_for_generate`, as `generate` does.
    """
    b, n = input_ids.shape
    if attention_mask is None:
        past = cache.get_seq_length()
        attention_mask = torch.ones((b, past + n), dtype=torch.bool, device=input_ids.device)
    dummy_embeds = torch.empty((b, n, 0), dtype=model.dtype, device=input_ids.device)
    encoder = encoder_module(model)
    mask_mapping = encoder.create_masks_for_generate(
        config=model.config, inputs_embeds=dummy_embeds, attention_mask=attention_mask, position_ids=position_ids,
        **_kw("DiffusionGemmaEncoderModel.create_masks_for_generate", cache))
    return encoder(input_ids=input_ids, attention_mask=mask_mapping, position_ids=position_ids,
                   **_kw("DiffusionGemmaEncoderModel.forward", cache), **kwargs)


def decoder_masks(model, cache, batch: int, width: int, attention_mask: torch.Tensor | None):  # [B, T + L] bool
    """The decoder's attention masks for a [batch, width] canvas over `cache` (pad columns False)."""
    return model.model.decoder.create_diffusion_decoder_attention_mask(
        config=model.config, inputs_embeds=torch.empty((batch, width, 1), device=model.device),
        decoder_attention_mask=attention_mask,
        **_kw("DiffusionGemmaDecoderModel.create_diffusion_decoder_attention_mask", cache))


def decoder_forward(model, cache, canvas: torch.Tensor,  # [B, L] token ids
                    position_ids: torch.Tensor,  # [1 or B, L]
                    masks=None, self_conditioning_logits: torch.Tensor | None = None) -> torch.Tensor:
    """One bidirectional decoder pass over the canvas, reading `cache`; returns logits [B, L, V]."""
    out = model(decoder_input_ids=canvas, self_conditioning_logits=self_conditioning_logits,
                decoder_attention_mask=masks, decoder_position_ids=position_ids,
                **_kw("DiffusionGemmaForBlockDiffusion.forward", cache))
    return out.logits


def decoder_hidden(model, cache, canvas: torch.Tensor,  # [B, L]
                   position_ids: torch.Tensor, attention_mask=None,
                   self_conditioning_logits: torch.Tensor | None = None) -> torch.Tensor:  # [B, L, D]
    """The decoder's last hidden state, before the LM head (training computes its loss from it)."""
    out = model.model.decoder(decoder_input_ids=canvas, decoder_position_ids=position_ids,
                              decoder_attention_mask=attention_mask,
                              self_conditioning_logits=self_conditioning_logits,
                              **_kw("DiffusionGemmaDecoderModel.forward", cache))
    return out.last_hidden_state


# ------------------------------------------------------------------ several requests in one decoder forward
_MEMBERS_ATTR = "_dg_edit_members"  # on a stacked cache: ((member cache, first row, end row), ...)
# On a CPU, the most bytes of one [rows, width, V] float32 buffer of a batched decoder forward (its
# self-conditioning input, that input's softmax): a batch over it runs in consecutive row groups under
# it. Why: glibc serves blocks over its largest mmap threshold (32 MiB on 64-bit) with fresh mappings,
# which every step page-faults in and unmaps again. 16 multi-line requests in one forward (48 rows of
# 62 slots, 97 MB) took 72,000 page faults and 125 ms of kernel time a step (of 775 ms); in row groups
# of 24 MB, 3,000 and 4 ms, at the same user time (the forward is bound by its vocabulary-wide compute,
# which a group split does not add to). GPUs keep one group: their caching allocator reuses blocks.
CPU_GROUP_BYTES = 32 << 20


class CannotBatch(ValueError):
    """These canvases cannot share one decoder forward (the caller runs them one by one)."""


@functools.cache
def _takes_self_conditioning_mask() -> bool:
    m = api().models.diffusion_gemma.modeling_diffusion_gemma
    return "self_conditioning_mask" in inspect.signature(m.DiffusionGemmaDecoderModel.forward).parameters


@dataclass
class BatchPart:
    """One request's share of a batched decoder forward: its canvas rows over its own encoder cache."""

    cache: Any  # its encoder cache, already repeated to its rows (`batch_repeat`)
    canvas: torch.Tensor  # [b, L] token ids
    position_ids: torch.Tensor  # [1 or b, L]
    attention_mask: torch.Tensor | None  # [b, T + L] bool (pad columns False); None: every position real
    self_conditioning_logits: torch.Tensor | None  # [b, L, V]; None on its first step


@dataclass
class StackedBatch:
    """The parts' caches padded to one length and stacked along the batch, with the masks that hide the
    padding: built once per batch composition (`stack_batch`) and reused while the parts keep their
    caches and layouts (`fits`)."""

    key: tuple  # what the stack was built from (compared by identity and length)
    sources: tuple  # the parts' caches and masks, held so that no other object can take their ids
    cache: Any  # the stacked cache  [B, H, T_max, D] per layer
    masks: dict  # layer pattern -> the decoder's mask in the installed attention implementation's format
    rows: tuple[int, ...]
    widths: tuple[int, ...]
    position_ids: torch.Tensor | None  # [B, L_max]; None when the batch runs in groups
    # (first part, end part, that group's own stack), consecutive: a batch over `CPU_GROUP_BYTES` on a CPU
    groups: tuple[tuple[int, int, "StackedBatch"], ...] = ()

    def fits(self, parts: list[BatchPart]) -> bool:
        return _batch_key(parts) == self.key


def _batch_key(parts: list[BatchPart]) -> tuple:
    return tuple((id(p.cache), p.cache.get_seq_length(), tuple(p.canvas.shape), id(p.attention_mask))
                 for p in parts)


def stack_batch(model, parts: list[BatchPart]) -> StackedBatch:
    """Pad every part's encoder cache to the longest (per layer pattern: sliding layers hold fewer states)
    and stack them along the batch; build the decoder masks that keep each row on its own prefix and on
    its own canvas's real positions. Raises `CannotBatch` when the installed attention implementation
    takes no explicit mask (padding would then be attended). On a CPU, a batch whose vocabulary-wide
    buffers would pass `CPU_GROUP_BYTES` is stacked as consecutive groups that each stay under it."""
    bounds = _row_groups(model, parts)
    if len(bounds) == 1:
        return _stack(model, parts)
    groups = tuple((i, j, _stack(model, parts[i:j])) for i, j in bounds)
    return StackedBatch(_batch_key(parts), tuple((p.cache, p.attention_mask) for p in parts), None, {},
                        tuple(p.canvas.shape[0] for p in parts), tuple(p.canvas.shape[1] for p in parts), None,
                        groups)


def _row_groups(model, parts: list[BatchPart]) -> list[tuple[int, int]]:
    """(first part, end part) of consecutive groups whose [rows, width, V] float32 buffer stays within
    `CPU_GROUP_BYTES` (a part larger than that is a group of its own); one group off the CPU."""
    if model.device.type != "cpu":
        return [(0, len(parts))]
    row_bytes = text_config(model).vocab_size * 4  # one canvas slot's float32 logits
    bounds, start, rows, width = [], 0, 0, 0
    for i, p in enumerate(parts):
        b, w = p.canvas.shape
        if i > start and (rows + b) * max(width, w) * row_bytes > CPU_GROUP_BYTES:
            bounds.append((start, i))
            start, rows, width = i, 0, 0
        rows, width = rows + b, max(width, w)
    bounds.append((start, len(parts)))
    return bounds


def _stack(model, parts: list[BatchPart]) -> StackedBatch:
    """`stack_batch` for one group: one stacked cache, one set of masks."""
    config = model.config
    m = api().masking_utils
    implementation = config._attn_implementation
    if implementation not in m.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise CannotBatch(f"attention implementation {implementation!r} takes no padding mask")
    device = model.device
    rows = tuple(p.canvas.shape[0] for p in parts)
    widths = tuple(p.canvas.shape[1] for p in parts)
    b_total, width = sum(rows), max(widths)
    layer_types = text_config(model).layer_types
    stacked = new_cache(model)
    kv_valid: dict[str, torch.Tensor] = {}  # pattern -> [B, T_max] bool
    for i, layer in enumerate(stacked.layers):
        keys = [p.cache.layers[i].keys for p in parts]  # [b, H, T, D] each
        values = [p.cache.layers[i].values for p in parts]
        t_max = max(k.shape[-2] for k in keys)
        k0 = keys[0]
        big_k = k0.new_zeros((b_total, k0.shape[1], t_max, k0.shape[3]))
        big_v = values[0].new_zeros((b_total, values[0].shape[1], t_max, values[0].shape[3]))
        valid = torch.zeros((b_total, t_max), dtype=torch.bool, device=device)
        r = 0
        for k, v, b in zip(keys, values, rows):
            if k.shape[0] != b:
                raise CannotBatch(f"a cache has {k.shape[0]} rows for a canvas of {b}")
            t = k.shape[-2]
            big_k[r : r + b, :, :t] = k
            big_v[r : r + b, :, :t] = v
            valid[r : r + b, :t] = True
            r += b
        layer.lazy_initialization(big_k, big_v)
        layer.keys, layer.values = big_k, big_v
        pattern = layer_types[i]
        if pattern in kv_valid and not torch.equal(kv_valid[pattern], valid):
            raise CannotBatch(f"layers of kind {pattern} hold different lengths")
        kv_valid[pattern] = valid
    canvas_valid = torch.zeros((b_total, width), dtype=torch.bool, device=device)
    position_ids = torch.zeros((b_total, width), dtype=parts[0].position_ids.dtype, device=device)
    r = 0
    for p, b, w in zip(parts, rows, widths):
        canvas_valid[r : r + b, :w] = True if p.attention_mask is None else p.attention_mask[:, -w:]
        position_ids[r : r + b, :w] = p.position_ids.expand(b, w)
        r += b
    mask_interface = m.ALL_MASK_ATTENTION_FUNCTIONS[implementation]
    masks = {}
    for pattern, valid in kv_valid.items():
        attention_mask = torch.cat([valid, canvas_valid], dim=1)  # [B, T_max + L_max]
        masks[pattern] = mask_interface(
            batch_size=b_total, q_length=width, kv_length=attention_mask.shape[1], q_offset=0, kv_offset=0,
            mask_function=m.bidirectional_mask_function, attention_mask=attention_mask, allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False, local_size=None, dtype=model.dtype, config=text_config(model),
            use_vmap=False, device=device)
    members, r = [], 0
    for p, b in zip(parts, rows):
        members.append((p.cache, r, r + b))
        r += b
    setattr(stacked, _MEMBERS_ATTR, tuple(members))
    return StackedBatch(_batch_key(parts), tuple((p.cache, p.attention_mask) for p in parts), stacked, masks,
                        rows, widths, position_ids)


def batch_members(cache) -> tuple:
    """((member cache, first row, end row), ...) of a stacked cache; () for a request's own cache."""
    return getattr(cache, _MEMBERS_ATTR, ())


def batched_decoder_forward(model, batch: StackedBatch, parts: list[BatchPart]) -> list[torch.Tensor]:
    """One decoder pass over every part's canvas; returns each part's logits [b, L, V] (float32).

    Rows without self-conditioning logits yet (their first step) get a zeroed signal, as alone. A batch
    stacked in groups (`CPU_GROUP_BYTES`) runs one decoder pass per group.
    """
    if batch.groups:
        return [logits for i, j, group in batch.groups for logits in batched_decoder_forward(model, group, parts[i:j])]
    device = model.device
    b_total, width = batch.position_ids.shape
    canvas = torch.zeros((b_total, width), dtype=parts[0].canvas.dtype, device=device)
    have = [p.self_conditioning_logits is not None for p in parts]
    sc = sc_mask = first = None
    if any(have):
        first = next(p.self_conditioning_logits for p in parts if p.self_conditioning_logits is not None)
        if all(have) and all(w == width for w in batch.widths):
            sc = torch.cat([p.self_conditioning_logits for p in parts])
        else:
            if not all(have) and not _takes_self_conditioning_mask():
                raise CannotBatch("this transformers release takes no per-row self-conditioning mask")
            sc = first.new_zeros((b_total, width, first.shape[-1]))
            sc_mask = torch.zeros(b_total, dtype=torch.bool, device=device)
    r = 0
    for p, b, w in zip(parts, batch.rows, batch.widths):
        canvas[r : r + b, :w] = p.canvas
        if sc is not None and sc_mask is not None and p.self_conditioning_logits is not None:
            sc[r : r + b, :w] = p.self_conditioning_logits
            sc_mask[r : r + b] = True
        r += b
    extra = {"self_conditioning_mask": sc_mask} if sc_mask is not None and not bool(sc_mask.all()) else {}
    del first
    hidden = model.model.decoder(decoder_input_ids=canvas, self_conditioning_logits=sc,
                                 decoder_attention_mask=batch.masks, decoder_position_ids=batch.position_ids,
                                 **_kw("DiffusionGemmaDecoderModel.forward", batch.cache), **extra).last_hidden_state
    del sc
    # The LM head per part, over its real positions only: no vocabulary-wide work on batch pad, and each
    # part's [b, L, V] logits are its own (no shared buffer kept alive by the slowest part).
    result, r = [], 0
    for b, w in zip(batch.rows, batch.widths):
        result.append(logits_from_hidden(model, hidden[r : r + b, :w]))
        r += b
    return result


# ------------------------------------------------------------------ tensor and expert parallel (torchrun)
PARALLEL_MODES = ("tp", "ep")
_ENCODER_TEXT = "model.encoder.language_model."
_DECODER = "model.decoder."


def parallel_plans(config) -> tuple[dict[str, str], dict[str, str], torch.nn.Module]:
    """The tp and ep plans transformers builds for this model (and the meta-device skeleton they came from).

    Asked of an instance built on the meta device (no memory, no weights), so the names are exactly the
    ones transformers' `init_parallel_plans` gives them: `lm_head` from the class, the text config's
    `base_model_tp_plan`/`base_model_ep_plan` under `model.encoder.language_model.`, the vision tower's,
    and the `embed_tokens: embedding_rowwise` rule transformers adds on its own.
    """
    with torch.device("meta"):
        skeleton = api().DiffusionGemmaForBlockDiffusion(config)
    return dict(skeleton.tp_plan), dict(skeleton.ep_plan), skeleton


def corrected_plan(plan: dict[str, str]) -> dict[str, str]:
    """A plan that works for DiffusionGemma: the decoder's modules named too, the tied embedding replicated.

    Why `from_pretrained(tp_plan="auto")` then `generate` fails with `aten.embedding.default got mixed
    torch.Tensor and DTensor` (transformers 5.23 and 5.24, whose `distributed/` code is identical):
    1. transformers roots the model's plan at the text config's base model, which for DiffusionGemma is
       the encoder's `model.encoder.language_model`. The decoder (`model.decoder.*`), which `generate`
       runs every step, is named nowhere.
    2. The decoder and the encoder share every text weight, and `DiffusionGemmaModel._tied_weights_keys`
       ties encoder <- decoder. `apply_tensor_parallelism` shards the encoder's parameters into DTensors
       and hooks the encoder's modules; loading then re-ties each encoder parameter to the decoder's,
       which nobody sharded. The encoder's modules keep their tensor-parallel forwards but now hold plain
       full tensors: the first one, the embedding (`embedding_rowwise`), turns its input into a DTensor
       and meets a plain weight. Hence "mixed torch.Tensor and DTensor" at the very first encoder call.
    3. The tied word embedding cannot be sharded at all here: the decoder's self-conditioning multiplies
       the softmax of the previous logits by `embed_tokens.weight` directly (no module forward to hook),
       and `lm_head` (`colwise_gather_output`) is that same tensor.
    The fix, without touching transformers' files: every rule under `model.encoder.language_model.` is
    given to `model.decoder.` too (so the decoder's parameters are sharded and its modules hooked, and
    the tie hands the encoder the same DTensors), and the embedding and `lm_head` rules become
    `replicate` (each rank keeps the full tied matrix; every rank computes full logits, which every rank
    needs anyway to sample the same canvas).
    """
    out = dict(plan)
    for name, style in plan.items():
        if name.startswith(_ENCODER_TEXT):
            out[_DECODER + name[len(_ENCODER_TEXT):]] = style
    for name in out:
        if name == "lm_head" or name.rsplit(".", 1)[-1] == "embed_tokens":
            out[name] = "replicate"
    return out


def tp_splits_experts(tp_plan: dict[str, str]) -> bool:
    """Whether transformers' tensor-parallel plan shards the MoE experts: 5.23 and 5.24 do
    (`moe_tp_experts`); 5.25 dropped those rules, so `--parallel tp` there holds every expert on
    every rank (dg-edit's copies of the old rules gave wrong text on 5.25; `--parallel ep` splits them)."""
    return any(name.endswith(".experts") for name in tp_plan)


def check_parallel(skeleton: torch.nn.Module, mode: str, world_size: int) -> None:
    """Raise `ValueError` with the fix unless `mode` can split this model over `world_size` ranks.

    Tensor parallel splits attention by heads and each expert by its hidden width; expert parallel keeps
    attention whole and gives each rank whole experts. A split that does not divide fails deep inside a
    forward with a shape error, so it is refused here, before any rank loads a weight.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    if world_size < 2:
        return
    for name, module in skeleton.named_modules():
        if not name.startswith(_DECODER):
            continue
        if mode == "tp" and isinstance(getattr(module, "k_proj", None), torch.nn.Linear):
            heads = module.q_proj.out_features // module.head_dim
            kv_heads = module.k_proj.out_features // module.head_dim
            if heads % world_size or kv_heads % world_size:
                raise ValueError(
                    f"--parallel tp over {world_size} ranks splits attention by heads, but {name} has {heads} "
                    f"query and {kv_heads} key/value heads: use a number of ranks that divides {kv_heads}, or "
                    "--parallel ep (attention whole on every rank, experts split)")
        experts = getattr(module, "gate_up_proj", None)
        if isinstance(experts, torch.Tensor) and experts.ndim == 3:
            n_experts, width = experts.shape[0], experts.shape[1] // 2
            if mode == "ep" and n_experts % world_size:
                raise ValueError(f"--parallel ep over {world_size} ranks needs the experts ({n_experts}) to divide "
                                 f"evenly ({name}); use a number of ranks that divides {n_experts}")
            if mode == "tp" and width % world_size:
                raise ValueError(f"--parallel tp over {world_size} ranks splits each expert's width ({width}, "
                                 f"{name}) and needs it to divide evenly")


def parallel_load_kwargs(model_dir: str | Path, mode: str, world_size: int) -> dict[str, Any]:
    """`from_pretrained` keyword arguments that shard the model over the torchrun ranks (`tp` or `ep`).

    `tp`: transformers' `base_model_tp_plan`, corrected (see `corrected_plan`). `ep`: transformers'
    `base_model_ep_plan` (experts dealt out whole, the dense MLP split, attention whole: the release's own
    comment says its 2 global key/value heads are too few to split), corrected the same way, with
    `ep_size == tp_size` as its all-reduce dispatch requires and every tensor-parallel rule `replicate`.
    Raises `ValueError` for a split that cannot work (`check_parallel`).
    """
    transformers = api()
    with _IMPORT_LOCK:
        from transformers.distributed import DistributedConfig

    config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    tp_plan, ep_plan, skeleton = parallel_plans(config)
    check_parallel(skeleton, mode, world_size)
    if mode == "tp":
        if not tp_splits_experts(tp_plan):
            logging.getLogger(__name__).warning(
                "dg-edit: --parallel tp with this transformers keeps every expert whole on every rank "
                "(its plan has no expert rule since 5.25); --parallel ep splits the experts")
        distributed = DistributedConfig(tp_plan=corrected_plan(tp_plan))
    else:
        distributed = DistributedConfig(tp_size=world_size, ep_size=world_size,
                                        tp_plan=dict.fromkeys(corrected_plan(tp_plan), "replicate"),
                                        ep_plan=corrected_plan(ep_plan))
    return {"distributed_config": distributed}
