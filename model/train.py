"""Train the embedded default model on the CPython standard library, on CPU.

    nice -n 10 python -m dg_edit.model.train --minutes 80 --out runs/default
    python -m dg_edit.model.train --minutes 80 --out runs/default --resume      # continue
    python -m dg_edit.model.train --export runs/default/ckpt.pt --to model/default

Objective (the engine's contract; see data.py): the prefix goes through the causal encoder,
the canvas (continuation or infill with a clamped suffix head) through the decoder; canvas
positions are noised at a level t ~ U(0, 1) (uniform random tokens, or ``<mask>`` with
``--noise mask``); cross-entropy on the clean canvas at noised positions. Self-conditioning
(logits of a no-grad first decoder pass) on ``--sc-prob`` of the steps. Optionally an
autoregressive next-token loss on the encoder's own outputs (``--ar-weight``): the encoder
and decoder share every weight, so this puts a loss on every prefix token for the price of
the LM head.

bf16 autocast (AMX), AdamW, linear warmup then cosine decay over the *time* budget (so the
schedule ends when the budget does), gradient clipping, checkpoints every few minutes
(model, optimizer, step, RNG, elapsed time), ``--resume``; Ctrl-C or SIGTERM stops after the
current step with the final validation and checkpoint.  Batches are a pure function of
(seed, step), so a resumed run sees the same data it would have seen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dg_edit import hf_adapter as hf

from . import corpus as corpus_mod
from .arch import build_model, count_parameters
from .data import Batch, Corpus, make_batch, noise_canvas
from .tokenizer import MASK_ID

DEFAULT_DIR = Path(__file__).resolve().parent / "default"

# Engine sampling defaults for the shipped model (dg_edit.json), chosen on 60 held-out tuning tasks
# (lines 101-160 of the exact-match task file; see MODEL_CARD.md).
DG_EDIT_DEFAULTS = {
    "noise": "mask",
    "mask_token_id": MASK_ID,
    "canvas_length": 64,
    "max_denoising_steps": 4,
    "entropy_bound": 4.0,
    "t_min": 0.1,
    "t_max": 0.3,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


# --------------------------------------------------------------------------- model I/O


def to_tensors(batch: Batch, noisy: np.ndarray) -> dict:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    pmask = t(batch.prefix_mask)
    pos = (pmask.cumsum(-1) - 1).clamp(min=0)
    n_real = pmask.sum(-1, keepdim=True)
    C = batch.canvas.shape[1]
    dec_pos = n_real + torch.arange(C)[None, :]
    cmask = t(batch.canvas_mask)
    dec_mask = torch.cat([pmask, cmask], dim=1).bool()
    return dict(
        input_ids=t(batch.input_ids),
        attention_mask=None if bool(pmask.all()) else pmask,
        position_ids=pos,
        decoder_input_ids=t(noisy),
        decoder_position_ids=dec_pos,
        decoder_attention_mask=None if bool(dec_mask.all()) else dec_mask,
    )


def diffusion_forward(model, inp: dict, self_condition: bool, want_encoder_logits: bool):
    """Encoder over the prefix (fills the KV cache), then the decoder over the canvas.

    Returns (canvas logits, encoder logits or None)."""
    cache = hf.new_cache(model)
    enc = hf.encoder_forward(model, cache, inp["input_ids"], inp["position_ids"], inp["attention_mask"])
    enc_logits = hf.logits_from_hidden(model, enc.last_hidden_state) if want_encoder_logits else None
    dec = dict(canvas=inp["decoder_input_ids"], position_ids=inp["decoder_position_ids"],
               attention_mask=inp["decoder_attention_mask"])
    sc_logits = None
    if self_condition:
        with torch.no_grad():
            sc_logits = hf.logits_from_hidden(model, hf.decoder_hidden(model, cache, **dec)).detach()
    hidden = hf.decoder_hidden(model, cache, **dec, self_conditioning_logits=sc_logits)
    return hf.logits_from_hidden(model, hidden), enc_logits


def compute_losses(model, batch: Batch, noisy: np.ndarray, noised: np.ndarray, self_condition: bool,
                   ar_weight: float) -> dict:
    inp = to_tensors(batch, noisy)
    logits, enc_logits = diffusion_forward(model, inp, self_condition, ar_weight > 0)
    target = torch.from_numpy(batch.canvas)
    sel = torch.from_numpy(noised)
    lg = logits[sel]
    tg = target[sel]
    loss = F.cross_entropy(lg, tg)
    with torch.no_grad():
        acc = (lg.argmax(-1) == tg).float().mean()
    out = dict(diff_loss=loss, acc=acc, n_noised=int(sel.sum()))
    total = loss
    if ar_weight > 0:
        ids = inp["input_ids"]
        pm = torch.from_numpy(batch.prefix_mask).bool()
        valid = pm[:, :-1] & pm[:, 1:]
        ar = F.cross_entropy(enc_logits[:, :-1][valid], ids[:, 1:][valid])
        out["ar_loss"] = ar
        total = total + ar_weight * ar
    out["loss"] = total
    return out


# --------------------------------------------------------------------------- helpers


def lr_at(frac: float, step: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    frac = min(max(frac, 0.0), 1.0)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def prefix_len_for(step_rng: np.random.Generator, args) -> int:
    if args.long_frac > 0 and step_rng.random() < args.long_frac:
        return int(step_rng.integers(args.prefix_max, args.long_prefix + 1))
    return int(step_rng.integers(args.prefix_min, args.prefix_max + 1))


def batch_for_step(corpus: Corpus, seed: int, step: int, args, vocab_size: int):
    rng = np.random.default_rng([seed, step])
    P = prefix_len_for(rng, args)
    bs = args.batch_size
    if P > args.prefix_max:  # keep tokens per step roughly constant
        bs = max(2, int(bs * (args.prefix_max + args.canvas_length) / (P + args.canvas_length)))
    batch = make_batch(corpus, rng, bs, P, canvas_length=args.canvas_length, infill_frac=args.infill_frac)
    noisy, noised = noise_canvas(batch.canvas, batch.clamped, rng, args.noise, vocab_size)
    sc = rng.random() < args.sc_prob
    return batch, noisy, noised, sc


def load_corpus(tokenizer_dir: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    files = corpus_mod.iter_files()
    train, valid = corpus_mod.split(files)
    return Corpus([f.text for f in train], tok), Corpus([f.text for f in valid], tok), len(train), len(valid)


def validation_batches(vcorpus: Corpus, args, vocab_size: int, n: int):
    """A fixed validation set: the same batches for every run with the same noise type."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([12345, i])
        P = [32, 128, 256, 448][i % 4]
        batch = make_batch(vcorpus, rng, 16, P, canvas_length=args.canvas_length, infill_frac=0.5)
        noisy, noised = noise_canvas(batch.canvas, batch.clamped, rng, args.noise, vocab_size)
        out.append((batch, noisy, noised))
    return out


@torch.no_grad()
def evaluate(model, vbatches, args) -> dict:
    model.eval()
    tot_loss = tot_acc = n = 0.0
    content_hit = content_n = 0.0
    kind_acc = {0: [0.0, 0.0], 1: [0.0, 0.0]}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        for batch, noisy, noised in vbatches:
            inp = to_tensors(batch, noisy)
            logits, _ = diffusion_forward(model, inp, False, False)
            target = torch.from_numpy(batch.canvas)
            sel = torch.from_numpy(noised)
            lg, tg = logits[sel], target[sel]
            tot_loss += float(F.cross_entropy(lg, tg, reduction="sum"))
            hit = (lg.argmax(-1) == tg).float()
            tot_acc += float(hit.sum())
            n += int(sel.sum())
            content = tg > MASK_ID  # not <pad>/<eos>/<bos>/<mask>: the code tokens themselves
            content_hit += float(hit[content].sum())
            content_n += int(content.sum())
            rows = torch.from_numpy(batch.kinds)[:, None].expand_as(sel)[sel]
            for k in (0, 1):
                kind_acc[k][0] += float(hit[rows == k].sum())
                kind_acc[k][1] += float((rows == k).sum())
    model.train()
    return dict(
        val_loss=tot_loss / max(n, 1),
        val_acc=tot_acc / max(n, 1),
        val_acc_content=content_hit / max(content_n, 1),
        val_acc_continuation=kind_acc[0][0] / max(kind_acc[0][1], 1),
        val_acc_infill=kind_acc[1][0] / max(kind_acc[1][1], 1),
        val_tokens=int(n),
    )


def save_checkpoint(path: Path, model, opt, step: int, elapsed: float, tokens: int, args, history) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        dict(
            model=model.state_dict(),
            optimizer=opt.state_dict(),
            step=step,
            elapsed=elapsed,
            tokens=tokens,
            args=vars(args),
            config=model.config.to_dict(),
            torch_rng=torch.get_rng_state(),
            history=history,
        ),
        tmp,
    )
    os.replace(tmp, path)


# --------------------------------------------------------------------------- export


def export(ckpt_path: Path, out_dir: Path, tokenizer_dir: Path = DEFAULT_DIR, dg_edit: dict | None = None) -> Path:
    """Write a loadable model directory: bf16 safetensors + configs + tokenizer + dg_edit.json."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    cfg = DiffusionGemmaConfig.from_dict(ck["config"])
    model = DiffusionGemmaForBlockDiffusion(cfg)
    model.load_state_dict(ck["model"])
    return export_model(model, out_dir, tokenizer_dir, dg_edit, noise=ck["args"].get("noise", "mask"))


def export_model(model, out_dir: Path, tokenizer_dir: Path = DEFAULT_DIR, dg_edit: dict | None = None,
                 noise: str = "mask") -> Path:
    from transformers import DiffusionGemmaGenerationConfig
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16).eval()
    settings = dict(DG_EDIT_DEFAULTS)
    settings["noise"] = noise
    settings["canvas_length"] = int(model.config.canvas_length)
    if (out_dir / "dg_edit.json").exists():
        settings.update(json.loads((out_dir / "dg_edit.json").read_text()))
        settings["noise"] = noise
    if dg_edit:
        settings.update(dg_edit)
    model.generation_config = DiffusionGemmaGenerationConfig(
        max_denoising_steps=settings["max_denoising_steps"],
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(settings["entropy_bound"])),
        t_min=settings["t_min"],
        t_max=settings["t_max"],
        stability_threshold=settings["stability_threshold"],
        confidence_threshold=settings["confidence_threshold"],
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    model.save_pretrained(out_dir)
    os.chmod(out_dir / "model.safetensors", 0o644)  # package data: readable by everyone
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = Path(tokenizer_dir) / name
        if src.exists() and src.resolve() != (out_dir / name).resolve():
            shutil.copy(src, out_dir / name)
    (out_dir / "dg_edit.json").write_text(json.dumps(settings, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------- main loop


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m dg_edit.model.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/default"))
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--noise", choices=["uniform", "mask"], default="mask")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--canvas-length", type=int, default=64)
    ap.add_argument("--prefix-min", type=int, default=16)
    ap.add_argument("--prefix-max", type=int, default=448)
    ap.add_argument("--long-prefix", type=int, default=1024)
    ap.add_argument("--long-frac", type=float, default=0.0)
    ap.add_argument("--infill-frac", type=float, default=0.5)
    ap.add_argument("--sc-prob", type=float, default=0.5)
    ap.add_argument("--ar-weight", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false")
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--eval-minutes", type=float, default=10.0)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--export", type=Path, help="export this checkpoint and exit")
    ap.add_argument("--validate", type=Path, help="print validation figures of this checkpoint and exit")
    ap.add_argument("--to", type=Path, default=DEFAULT_DIR, help="export destination")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export:
        out = export(args.export, args.to, args.tokenizer)
        print(f"exported {args.export} -> {out}")
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.validate:
        from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

        ck = torch.load(args.validate, map_location="cpu", weights_only=False)
        model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig.from_dict(ck["config"]))
        model.load_state_dict(ck["model"])
        args.noise = ck["args"]["noise"]
        _, vcorpus, _, _ = load_corpus(args.tokenizer)
        v = evaluate(model, validation_batches(vcorpus, args, model.config.text_config.vocab_size,
                                               args.eval_batches), args)
        v.update(noise=args.noise, step=ck["step"], tokens=ck["tokens"], minutes=round(ck["elapsed"] / 60, 2))
        print(json.dumps(v))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "ckpt.pt"
    log = open(args.out / "log.jsonl", "a")

    corpus, vcorpus, n_train, n_valid = load_corpus(args.tokenizer)
    model = build_model(args.preset, seed=args.seed, canvas_length=args.canvas_length)
    vocab = model.config.text_config.vocab_size
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    step, elapsed0, tokens, history = 0, 0.0, 0, []
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, elapsed0, tokens = ck["step"], ck["elapsed"], ck["tokens"]
        history = ck.get("history", [])
        torch.set_rng_state(ck["torch_rng"])
        print(f"resumed from {ckpt_path} at step {step} ({elapsed0 / 60:.1f} min, {tokens:,} tokens)", flush=True)
    (args.out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))
    print(f"model: {count_parameters(model):,} parameters ({args.preset}); noise={args.noise}; "
          f"corpus {corpus_mod.python_version()}: {n_train} train / {n_valid} validation files", flush=True)

    vbatches = validation_batches(vcorpus, args, vocab, args.eval_batches)
    model.train()
    with _stop_on_signal() as stop_requested:
        return _train_loop(args, model, opt, corpus, vocab, vbatches, log, history, ckpt_path, step, tokens,
                           elapsed0, stop_requested)


@contextlib.contextmanager
def _stop_on_signal():
    """Ctrl-C (SIGINT) or SIGTERM ends training after the current step, with the final validation and
    checkpoint, so stopping a long run early loses nothing; a second signal stops at once.
    Yields the list the first signal's name is put in."""
    requested: list[str] = []

    def handle(signum, frame) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train_loop(args, model, opt, corpus, vocab, vbatches, log, history, ckpt_path, step, tokens, elapsed0,
                stop_requested: list[str]) -> int:
    """Steps until the time budget, --max-steps or a stop signal; then the final validation and checkpoint."""
    budget = args.minutes * 60
    t_start = time.time() - elapsed0
    last_ckpt = last_eval = time.time()
    tty = sys.stdout.isatty()
    win_tok, win_t, win_loss, win_acc, win_ar, win_n = 0, time.time(), 0.0, 0.0, 0.0, 0
    while True:
        elapsed = time.time() - t_start
        if elapsed >= budget or (args.max_steps and step >= args.max_steps) or stop_requested:
            break
        lr = lr_at(elapsed / budget, step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        batch, noisy, noised, sc = batch_for_step(corpus, args.seed, step, args, vocab)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = compute_losses(model, batch, noisy, noised, sc, args.ar_weight)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        n_tok = batch.n_tokens
        tokens += n_tok
        win_tok += n_tok
        win_loss += out["diff_loss"].item()
        win_acc += float(out["acc"])
        win_ar += out["ar_loss"].item() if "ar_loss" in out else 0.0
        win_n += 1
        if step % args.log_every == 0:
            dt = time.time() - win_t
            rec = dict(step=step, min=round((time.time() - t_start) / 60, 2), loss=round(win_loss / win_n, 4),
                       acc=round(win_acc / win_n, 4), ar=round(win_ar / win_n, 4), tok_s=round(win_tok / dt),
                       lr=lr, tokens=tokens)
            pct = 100 * min(1.0, (time.time() - t_start) / budget)
            line = (f"[{pct:5.1f}%] step {step} | {rec['min']:.1f} min | loss {rec['loss']:.3f} "
                    f"acc {rec['acc']:.3f} ar {rec['ar']:.3f} | {rec['tok_s']:,} tok/s | lr {lr:.2e} "
                    f"| {tokens / 1e6:.2f}M tok")
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            win_tok, win_t, win_loss, win_acc, win_ar, win_n = 0, time.time(), 0.0, 0.0, 0.0, 0
        if time.time() - last_eval > args.eval_minutes * 60:
            v = evaluate(model, vbatches, args)
            v.update(step=step, min=round((time.time() - t_start) / 60, 2), tokens=tokens)
            history.append(v)
            log.write(json.dumps(v) + "\n")
            log.flush()
            print(f"\nvalidation: {json.dumps(v)}", flush=True)
            last_eval = time.time()
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            save_checkpoint(ckpt_path, model, opt, step, time.time() - t_start, tokens, args, history)
            last_ckpt = time.time()
    elapsed = time.time() - t_start
    if stop_requested:
        print(f"\n{stop_requested[0]}: stopping early at step {step}; final validation and checkpoint "
              "(signal again to stop at once)", flush=True)
    v = evaluate(model, vbatches, args)
    v.update(step=step, min=round(elapsed / 60, 2), tokens=tokens, final=True)
    history.append(v)
    log.write(json.dumps(v) + "\n")
    log.close()
    save_checkpoint(ckpt_path, model, opt, step, elapsed, tokens, args, history)
    print(f"\nfinal validation: {json.dumps(v)}", flush=True)
    print(f"done: {step} steps, {tokens:,} tokens, {elapsed / 60:.1f} min, {tokens / max(elapsed, 1e-9):,.0f} tok/s",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
