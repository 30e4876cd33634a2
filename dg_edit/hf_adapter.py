"""The one module that touches transformers' DiffusionGemma internals.

Why one module: transformers moves. 5.24 renamed `past_key_values` to `cache` across
`models/diffusion_gemma` (the `forward` methods keep a deprecated alias until 5.40; the static mask
builders and the generation output do not), and every fresh install broke while CI stayed green
on an old site-packages. Everything dg-edit needs below the public `from_pretrained`/`generate`
surface goes through the functions here: encoder forward into a cache, decoder forward over a
canvas, the encoder and decoder mask builders, cache creation, past recording and crop, batch
repeat, the embedding dtype, the LM head. Nothing else in the project passes `past_key_values=` or
`cache=` to transformers or reaches into `model.model.*`.

How it adapts: by what the installed code accepts (signatures, attributes), looked up once per
function and kept in `functools.cache`, never by comparing version strings. Each adaptation names
the release that changed it. The supported range itself lives in pyproject.toml (the installed
package's metadata); `check_transformers` reads it from there so the two cannot drift.
"""

from __future__ import annotations

import functools
import inspect
import json
import threading
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

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


def check_transformers() -> str:
    """Raise `UnsupportedTransformers` with a one-line fix unless the installed release is supported.

    Runs before any model is loaded (and before transformers is imported), so a user outside the
    range sees which version is installed, which range is supported and the pip command that fixes it
    instead of a traceback from deep inside a forward pass. Returns the installed version.
    """
    try:
        installed = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        raise UnsupportedTransformers("transformers is not installed; run: pip install -e .") from None
    spec = supported_range()
    if spec:
        from packaging.specifiers import SpecifierSet

        if not SpecifierSet(spec).contains(installed, prereleases=True):
            raise UnsupportedTransformers(
                f"transformers {installed} is installed, but dg-edit supports transformers{spec}; "
                f"run: pip install 'transformers{spec}'")
    return installed


def check_model_type(model_dir: str | Path) -> None:
    """Raise `NotDiffusionGemma` naming the `model_type` of a config.json that is not DiffusionGemma."""
    path = Path(model_dir) / "config.json"
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
        import transformers
        from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion, DynamicCache  # noqa: F401
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


def generation_cache(output):
    """The cache a `generate` output carries: `.cache` since 5.24, `.past_key_values` before."""
    return getattr(output, "cache", None) if hasattr(output, "cache") else getattr(output, "past_key_values", None)


# ------------------------------------------------------------------ modules and dtypes
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
