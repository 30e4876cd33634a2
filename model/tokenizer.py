"""Byte-level BPE tokenizer for the embedded model, trained on the stdlib training split.

Special tokens have fixed ids the engine relies on:
0 <pad>, 1 <eos>, 2 <bos>, 3 <mask>, 4 <instruction>, 5 </instruction>.

    python -m dg_edit.model.tokenizer --out model/default
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import corpus

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<mask>", "<instruction>", "</instruction>"]
PAD_ID, EOS_ID, BOS_ID, MASK_ID, INSTR_ID, INSTR_END_ID = range(6)
VOCAB_SIZE = 8192


def build_tokenizer(texts, vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "model_max_length": 4096,
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "mask_token": "<mask>",
    "unk_token": None,
    "additional_special_tokens": ["<instruction>", "</instruction>"],
    "add_bos_token": False,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
}


def save(tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "pad_token": "<pad>",
                "eos_token": "<eos>",
                "bos_token": "<bos>",
                "mask_token": "<mask>",
                "additional_special_tokens": ["<instruction>", "</instruction>"],
            },
            indent=2,
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "default")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args(argv)
    t0 = time.time()
    train, _valid = corpus.split(corpus.iter_files())
    tok = build_tokenizer((f.text for f in train), args.vocab_size)
    save(tok, args.out)
    n = sum(len(tok.encode(f.text).ids) for f in train[:200])
    c = sum(len(f.text) for f in train[:200])
    print(f"tokenizer: {tok.get_vocab_size()} tokens, {c / n:.2f} chars/token on 200 files, "
          f"{time.time() - t0:.0f}s, corpus {corpus.python_version()} ({len(train)} train files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
