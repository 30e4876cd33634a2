"""Training examples for the embedded model, built the way the engine will see them.

Every example is cut from a source file at *character* positions and the pieces are
tokenized separately (prefix alone, middle alone, suffix alone), because that is what the
engine does at inference: it never sees a joint tokenization across the cursor.

Shapes (the engine's contract):
- encoder input: the prefix, ``<bos>`` first when it reaches the start of the file;
  positions 0..P-1; left-padded with ``<pad>`` (masked out) when shorter than the batch's P.
- canvas (decoder input, length ``canvas_length``), positions P..P+C-1:
  (a) continuation: the next tokens of the file; at the end of the file ``<eos>`` then ``<pad>``;
  (b) infill: ``[middle (m), <eos>, <pad> * k, suffix head (S)]`` with L = m + 1 + k slots and
      L + S <= C; the suffix head is *clamped* (never noised, no loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID


@dataclass
class Batch:
    input_ids: np.ndarray  # [B, P] left-padded prefix
    prefix_mask: np.ndarray  # [B, P] 1 = real token
    canvas: np.ndarray  # [B, C] clean canvas
    clamped: np.ndarray  # [B, C] bool: suffix-head (and absent) positions: never noised, no loss
    canvas_mask: np.ndarray  # [B, C] 1 = position exists (0: beyond L + S, attention-masked)
    kinds: np.ndarray  # [B] 0 continuation, 1 infill

    @property
    def n_tokens(self) -> int:
        return int(self.prefix_mask.sum()) + int(self.canvas_mask.sum())


class Corpus:
    """Files as text plus a length-weighted sampler."""

    def __init__(self, texts: list[str], tokenizer):
        self.texts = [t for t in texts if len(t) >= 16]
        self.tok = tokenizer  # a `tokenizers.Tokenizer`
        lens = np.array([len(t) for t in self.texts], dtype=np.float64)
        self.p = lens / lens.sum()

    def encode(self, s: str) -> list[int]:
        return self.tok.encode(s).ids if s else []

    def encode_batch(self, ss: list[str]) -> list[list[int]]:
        out = [[] for _ in ss]
        idx = [i for i, s in enumerate(ss) if s]
        if idx:
            enc = self.tok.encode_batch([ss[i] for i in idx])
            for i, e in zip(idx, enc):
                out[i] = e.ids
        return out


def _line_bounds(text: str, pos: int) -> tuple[int, int]:
    """[start, end) of the line containing pos; end includes the newline."""
    s = text.rfind("\n", 0, pos) + 1
    e = text.find("\n", pos)
    e = len(text) if e < 0 else e + 1
    return s, e


def _pick_span(text: str, rng: np.random.Generator) -> tuple[int, int]:
    """A middle span [a, b) biased towards line shapes."""
    n = len(text)
    pos = int(rng.integers(0, n))
    s, e = _line_bounds(text, pos)
    r = rng.random()
    if r < 0.40:  # one whole line, newline included (HumanEval single-line shape)
        a, b = s, e
        if rng.random() < 0.25:  # cursor after the indentation
            a = s + (len(text[s:e]) - len(text[s:e].lstrip(" \t")))
            a = min(a, e)
        if rng.random() < 0.15 and b > a and text[b - 1] == "\n":  # line without its newline
            b -= 1
    elif r < 0.60:  # a few whole lines
        a, b = s, e
        for _ in range(int(rng.integers(1, 6))):
            if b >= n:
                break
            b = _line_bounds(text, b)[1]
    elif r < 0.85:  # part of a line: from inside to the end of the line (or a random point)
        a = int(rng.integers(s, max(s + 1, e)))
        b = e if rng.random() < 0.6 else int(rng.integers(a, e + 1))
        if b > a and text[b - 1] == "\n" and rng.random() < 0.5:
            b -= 1
    else:  # random character span
        a = pos
        b = min(n, a + int(rng.integers(1, 160)))
    return a, max(a, b)


def make_batch(
    corpus: Corpus,
    rng: np.random.Generator,
    batch_size: int,
    prefix_len: int,
    canvas_length: int = 64,
    infill_frac: float = 0.5,
    max_suffix: int = 16,
    bos_frac: float = 0.1,
) -> Batch:
    C = canvas_length
    P = prefix_len
    files = rng.choice(len(corpus.texts), size=batch_size, p=corpus.p)
    kinds = (rng.random(batch_size) < infill_frac).astype(np.int64)
    prefixes: list[str] = []
    middles: list[str] = []
    suffixes: list[str] = []
    at_start: list[bool] = []
    char_window = P * 6 + 64
    for i in range(batch_size):
        text = corpus.texts[files[i]]
        n = len(text)
        if kinds[i]:
            a, b = _pick_span(text, rng)
        else:
            a = int(rng.integers(1, n)) if rng.random() > 0.03 else 0
            # continuations start at line starts a third of the time (typing a new line)
            if rng.random() < 0.33:
                a = _line_bounds(text, a)[0]
            b = a
        if rng.random() < bos_frac:  # make the prefix reach the start of the file
            shift = max(0, a - int(rng.integers(0, char_window // 2 + 1)))
            a, b = a - shift, b - shift
        lo = max(0, a - char_window)
        prefixes.append(text[lo:a])
        at_start.append(lo == 0)
        middles.append(text[a:b] if kinds[i] else "")
        # continuation: the "suffix" is the rest of the file (the canvas is read from it)
        suffixes.append(text[b : b + (C * 8 if not kinds[i] else max_suffix * 8)])

    pre_ids = corpus.encode_batch(prefixes)
    mid_ids = corpus.encode_batch(middles)
    suf_ids = corpus.encode_batch(suffixes)

    input_ids = np.full((batch_size, P), PAD_ID, dtype=np.int64)
    prefix_mask = np.zeros((batch_size, P), dtype=np.int64)
    canvas = np.full((batch_size, C), PAD_ID, dtype=np.int64)
    clamped = np.zeros((batch_size, C), dtype=bool)
    canvas_mask = np.ones((batch_size, C), dtype=np.int64)
    for i in range(batch_size):
        ids = ([BOS_ID] if at_start[i] else []) + pre_ids[i]
        ids = ids[-P:] if P > 0 else []
        if len(ids) == 0:
            ids = [BOS_ID]
        input_ids[i, P - len(ids) :] = ids
        prefix_mask[i, P - len(ids) :] = 1
        if not kinds[i]:
            text_end = len(suffixes[i]) < C * 8
            cont = suf_ids[i][:C]
            # the rest of the file was included in full: mark its end
            if len(cont) < C and text_end:
                cont = cont + [EOS_ID]
            canvas[i, : len(cont)] = cont[:C]
            continue
        mid = mid_ids[i]
        S = int(rng.integers(0, max_suffix + 1)) if rng.random() < 0.9 else 0
        suf = suf_ids[i][:S]
        S = len(suf)
        room = C - S
        m = len(mid)
        if m + 1 <= room:
            u = rng.random()
            if u < 0.4:  # all the slots there are
                L = room
            elif u < 0.8:
                L = int(rng.integers(m + 1, room + 1))
            else:  # exactly enough
                L = m + 1
            row = mid + [EOS_ID] + [PAD_ID] * (L - m - 1)
        else:  # the middle does not fit: the slots hold its first part (more blocks follow)
            row = mid[:room]
            L = room
        canvas[i, :L] = row
        canvas[i, L : L + S] = suf
        clamped[i, L : L + S] = True
        # a canvas of L + S positions: the rest of the row does not exist (attention-masked)
        clamped[i, L + S :] = True
        canvas_mask[i, L + S :] = 0
    return Batch(input_ids, prefix_mask, canvas, clamped, canvas_mask, kinds)


def noise_canvas(
    canvas: np.ndarray,
    clamped: np.ndarray,
    rng: np.random.Generator,
    noise: str,
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Noise a fraction t ~ U(0, 1) of each row's free positions (at least one)."""
    B, C = canvas.shape
    noisy = canvas.copy()
    noised = np.zeros_like(clamped)
    for i in range(B):
        free = np.flatnonzero(~clamped[i])
        if len(free) == 0:
            continue
        t = rng.random()
        k = max(1, int(round(t * len(free))))
        pos = rng.choice(free, size=k, replace=False)
        noised[i, pos] = True
        if noise == "mask":
            noisy[i, pos] = MASK_ID
        else:
            noisy[i, pos] = rng.integers(0, vocab_size, size=k)
    return noisy, noised
