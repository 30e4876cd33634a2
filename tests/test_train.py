"""The training script on a tiny config: loss falls, checkpoints round-trip, resume is exact.

CI never trains the real model; everything here takes a few seconds on CPU.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dg_edit.model import train as T
from dg_edit.model.arch import build_model
from dg_edit.model.data import Corpus, make_batch, noise_canvas
from dg_edit.model.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, SPECIAL_TOKENS

TINY = ["--preset", "tiny", "--batch-size", "4", "--prefix-min", "8", "--prefix-max", "24",
        "--eval-batches", "1", "--warmup-steps", "100", "--threads", "1", "--minutes", "100", "--log-every", "1"]


@pytest.fixture(scope="module")
def corpus():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(T.DEFAULT_DIR / "tokenizer.json"))
    texts = [
        "import os\n\n\ndef main(argv):\n    for a in argv:\n        print(a)\n    return 0\n",
        "class A:\n    def __init__(self, x):\n        self.x = x\n\n    def get(self):\n        return self.x\n",
    ] * 4
    return Corpus(texts, tok)


def test_special_token_ids():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(T.DEFAULT_DIR / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert (PAD_ID, EOS_ID, BOS_ID, MASK_ID) == (0, 1, 2, 3)


def test_batch_shapes_and_contract(corpus):
    rng = np.random.default_rng(0)
    b = make_batch(corpus, rng, 16, 20, canvas_length=32, infill_frac=1.0)
    assert b.input_ids.shape == (16, 20) and b.canvas.shape == (16, 32)
    for i in range(16):
        row, cl = b.canvas[i], b.clamped[i]
        free = np.flatnonzero(~cl)
        # the slots are contiguous from the start of the canvas; the suffix head follows them
        assert free.tolist() == list(range(len(free)))
        slots = row[: len(free)].tolist()
        if EOS_ID in slots:  # middle, <eos>, then only <pad> up to the suffix head
            e = slots.index(EOS_ID)
            assert all(t == PAD_ID for t in slots[e + 1 :])
    noisy, noised = noise_canvas(b.canvas, b.clamped, rng, "mask", 8192)
    assert not (noised & b.clamped).any()  # clamped positions are never noised
    assert (noised.sum(1) >= 1).all()
    assert (noisy[noised] == MASK_ID).all() and (noisy[~noised] == b.canvas[~noised]).all()


def test_loss_falls_on_fixed_batch(corpus):
    torch.manual_seed(0)
    model = build_model("tiny", canvas_length=32)
    rng = np.random.default_rng(1)
    batch = make_batch(corpus, rng, 8, 24, canvas_length=32)
    noisy, noised = noise_canvas(batch.canvas, batch.clamped, rng, "mask", model.config.text_config.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(12):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = T.compute_losses(model, batch, noisy, noised, self_condition=step % 2 == 1, ar_weight=0.5)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["diff_loss"].item())
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses


def test_checkpoint_roundtrip_and_resume(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert T.main(TINY + ["--out", str(a), "--max-steps", "4"]) == 0
    assert T.main(TINY + ["--out", str(b), "--max-steps", "2"]) == 0
    assert T.main(TINY + ["--out", str(b), "--max-steps", "4", "--resume"]) == 0
    ca = torch.load(a / "ckpt.pt", weights_only=False)
    cb = torch.load(b / "ckpt.pt", weights_only=False)
    assert ca["step"] == cb["step"] == 4
    assert ca["tokens"] == cb["tokens"]
    for k, v in ca["model"].items():
        torch.testing.assert_close(v, cb["model"][k], msg=k)
    lines = [json.loads(x) for x in (a / "log.jsonl").read_text().splitlines()]
    assert any("val_acc" in x for x in lines) and any("tok_s" in x for x in lines)

    # export: a bf16 model directory that from_pretrained and AutoTokenizer load
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    out = T.export(a / "ckpt.pt", tmp_path / "export")
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "dg_edit.json"):
        assert (out / name).exists(), name
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    sd = model.state_dict()
    for k, v in ca["model"].items():
        if k in sd:
            torch.testing.assert_close(sd[k].float(), v.to(torch.bfloat16).float(), msg=k)
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.mask_token_id) == (0, 1, 2, 3)
    settings = json.loads((out / "dg_edit.json").read_text())
    assert settings["noise"] in ("mask", "uniform") and settings["mask_token_id"] == 3


def test_ctrl_c_stops_after_the_step_with_a_final_checkpoint(tmp_path):
    # A long run stopped early (Ctrl-C, or SIGTERM from a scheduler) keeps its progress.
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dg_edit.model.train", *TINY, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        log = out / "log.jsonl"
        while not (log.exists() and '"tok_s"' in log.read_text()):  # a few steps have run
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "SIGINT: stopping early" in output
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert ck["step"] >= 1 and records[-1].get("final") and records[-1]["step"] == ck["step"]
