"""Tiny random DiffusionGemma models for tests and benchmarks (no download, seconds to build)."""

from __future__ import annotations

import asyncio

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

# The default Gemma 4 vision tower alone is 151M parameters; this one is unused but required.
TINY_VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=16)


def tiny_config(canvas_length: int = 16, vocab_size: int = 128, hidden_size: int = 32, layers: int = 2,
                sliding_window: int = 32, **text) -> DiffusionGemmaConfig:
    text_config = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       global_head_dim=16, num_experts=2, top_k_experts=1, moe_intermediate_size=hidden_size,
                       sliding_window=sliding_window, max_position_embeddings=8192,
                       layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])
    text_config.update(text)
    return DiffusionGemmaConfig(text_config=text_config, vision_config=dict(TINY_VISION), canvas_length=canvas_length)


def tiny_model(seed: int = 0, **kwargs) -> DiffusionGemmaForBlockDiffusion:
    """A random model; `seed` fixes its weights."""
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(tiny_config(**kwargs)).eval()


SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<mask>", "<instruction>", "</instruction>"]


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained in memory on a little Python (ids 0..5 are the special tokens).

    Its corpus, `testing_corpus.txt`, is dg_edit/config.py as it read at commit f7282d7, kept as data: the
    tokenizer used to be trained on config.py's live source, so every edit of a Settings docstring changed
    its merges, hence the token ids and the random models' answers that seed-picked tests rely on."""
    from importlib import resources

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = resources.files("dg_edit").joinpath("testing_corpus.txt").read_text(encoding="utf-8")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   mask_token="<mask>")


def tiny_pair(seed: int = 0, vocab_size: int = 320, **kwargs):
    """A tiny random model and a matching tokenizer, with pad/eos/bos wired into the generation config."""
    tokenizer = tiny_tokenizer(vocab_size)
    model = tiny_model(seed=seed, vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2, **kwargs)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    model.generation_config.bos_token_id = 2
    return model, tokenizer


def save_tiny_model_dir(path, seed: int = 0, max_denoising_steps: int = 8, **kwargs):
    """Write a loadable model directory (config, safetensors, tokenizer) for end-to-end tests."""
    import json
    from pathlib import Path

    model, tokenizer = tiny_pair(seed=seed, **kwargs)
    model.generation_config.max_denoising_steps = max_denoising_steps
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    (Path(path) / "dg_edit.json").write_text(json.dumps({"max_denoising_steps": max_denoising_steps}))
    return Path(path)


def plain(value):
    """pygls hands custom payloads (dgEdit/stats) over as namedtuple-like `Object`s: dicts and lists."""
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


async def stop_language_client(client, timeout: float) -> None:
    """Shut down a pygls `LanguageClient` started with `start_io` as an editor does (shutdown, exit,
    wait for the server process), killing the process if it does not go within `timeout` per stage."""
    proc = client._server
    try:
        await asyncio.wait_for(client.shutdown_async(None), timeout)
        client.exit(None)
        await asyncio.wait_for(proc.wait(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
        await client.stop()


def first_step_top1_agreement(model_a, model_b, prompts: list[list[int]], canvas_length: int = 32,
                              seed: int = 0) -> float:
    """Share of canvas positions where two models' first-step logits have the same argmax.

    The measure for a quantized model against its full-precision self: each prompt is encoded, a
    random canvas (the same for both) is decoded once without self-conditioning, as the first
    denoising step does, and the argmax tokens are compared.
    """
    from . import hf_adapter as hf

    same = total = 0
    generator = torch.Generator().manual_seed(seed)
    vocab = model_a.config.get_text_config().vocab_size
    for ids in prompts:
        canvas = torch.randint(0, vocab, (1, canvas_length), generator=generator)
        positions = torch.arange(len(ids), len(ids) + canvas_length)[None]
        argmaxes = []
        for model in (model_a, model_b):
            with torch.no_grad():
                cache = hf.new_cache(model)
                prompt = torch.tensor([ids], device=model.device)
                hf.encoder_forward(model, cache, prompt, torch.arange(len(ids), device=model.device)[None])
                logits = hf.decoder_forward(model, cache, canvas.to(model.device), positions.to(model.device))
            argmaxes.append(logits.argmax(-1).cpu())
        same += int((argmaxes[0] == argmaxes[1]).sum())
        total += canvas_length
    return same / total
