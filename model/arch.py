"""Model configurations for the embedded default model (and the tiny CI model)."""

from __future__ import annotations

from .tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

# Minimal vision tower: DiffusionGemma always builds one; the default alone is 151M parameters.
MINIMAL_VISION = dict(
    model_type="gemma4_vision",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    position_embedding_size=16,
)

PRESETS = {
    # the shipped model: sized for the CPU this was trained on (2 shared cores, no AMX)
    "default": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=3,
                    head_dim=64, intermediate_size=512, num_experts=2, top_k_experts=1,
                    moe_intermediate_size=512),
    "d256l6": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                    head_dim=64, intermediate_size=768, num_experts=2, top_k_experts=1,
                    moe_intermediate_size=768),
    "wide": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                 head_dim=64, intermediate_size=1024, num_experts=2, top_k_experts=1,
                 moe_intermediate_size=1024),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  head_dim=64, intermediate_size=512, num_experts=2, top_k_experts=1,
                  moe_intermediate_size=512),
    # CI: a few seconds per step at most
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 head_dim=16, intermediate_size=64, num_experts=2, top_k_experts=1,
                 moe_intermediate_size=64),
}


def make_config(preset: str = "default", canvas_length: int = 64, vocab_size: int = VOCAB_SIZE, **overrides):
    from transformers import DiffusionGemmaConfig

    text = dict(PRESETS[preset])
    text.update(overrides)
    head_dim = text["head_dim"]
    n = text["num_hidden_layers"]
    text.setdefault("layer_types", ["sliding_attention"] * (n - 1) + ["full_attention"])
    text.update(
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        sliding_window=512,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        # the full-attention layers default to head_dim 512: keep them at the model's head_dim
        global_head_dim=head_dim,
    )
    cfg = DiffusionGemmaConfig(
        text_config=text,
        vision_config=dict(MINIMAL_VISION),
        canvas_length=canvas_length,
        # image tokens are unused; keep their ids inside the vocabulary
        boi_token_id=None,
        eoi_token_id=None,
        image_token_id=None,
    )
    cfg.pad_token_id = PAD_ID
    cfg.eos_token_id = EOS_ID
    cfg.bos_token_id = BOS_ID
    return cfg


def build_model(preset: str = "default", seed: int = 0, **kw):
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    cfg = make_config(preset, **kw)
    model = DiffusionGemmaForBlockDiffusion(cfg)
    return model


def count_parameters(model) -> int:
    seen = set()
    n = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel()
    return n
