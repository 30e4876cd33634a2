"""Per-document encoder caches: the encoder K/V of every window of a document, kept across requests.

Why this works: DiffusionGemma's encoder is causal and the suffix lives in the canvas, not in the
encoder. So the encoder states of the first c tokens of a prefix do not depend on anything after c:
one pass over a document serves a completion at *any* cursor in it (its first c states, as they
are), and an edit at token p invalidates only the states after p. (An autoregressive
fill-in-the-middle server cannot do this: its suffix sits inside the prompt.)

Pieces, from small to large:

- `Strip`: the states of one token sequence from position 0: one *window* of a document (a
  request's prefix is windowed on the left in coarse steps, `Engine._prefix_window`, so every
  window starts at position 0). Full chunks of `chunk` tokens at positions that are multiples of
  `chunk`, plus at most one partial `tail` chunk at its end.
- `CacheStore`: every strip of every document (`session`) of one engine, keyed by (session, window
  key), within a byte budget; least recently used documents are evicted first.
- `encode_from`: the one encoder loop; requests (`CacheStore.encode`) and idle prefill
  (`CacheStore.prefill_step`) both go through it.

Bitwise rule: every state is computed by `encode_chunk` over the chunk [k*chunk, min((k+1)*chunk, n))
of its own token sequence, on a cache that holds exactly the states before it. The encoder's
shapes and inputs are then a function of the tokens alone, so a warm request (reusing any stored
chunks) computes the same bits as a cold one (a fresh engine encoding everything). Reuse is by
longest common token prefix (LCP), floored to a chunk: the last tokens of a prefix cut at the
cursor may tokenize differently from the whole document's, and that costs at most the chunk
holding them.

Strip buffers grow in place; the part of a buffer handed to a request (`Strip.states`) is never
written again (copy-on-write), so a request in flight keeps its states while prefill or another
request moves the strip on.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable

import torch

from . import hf_adapter as hf

def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# ---------------------------------------------------------------------------------------------- strips
@dataclass(eq=False)
class Strip:
    """Encoder states of one token sequence from position 0 (one window of one document).

    `ids[:length]` have their states in `keys[i][..., :length, :]` / `values[i]` (per layer,
    [1, H, capacity, D]); `length` is always a multiple of the chunk. `tail_ids` (shorter than a
    chunk) follow them, with states computed as one partial chunk, kept in `tail_keys`/`tail_values`.
    """

    ids: list[int] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    tail_ids: list[int] = field(default_factory=list)
    tail_keys: list[torch.Tensor] = field(default_factory=list)
    tail_values: list[torch.Tensor] = field(default_factory=list)
    watermark: int = 0  # positions of the buffers handed out to requests: never written again
    last_used: int = 0  # the store's tick of the last request that read it (prefill does not count)

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (*self.keys, *self.values, *self.tail_keys, *self.tail_values))

    def lcp(self, ids: list[int]) -> int:
        """Tokens of `ids` this strip has (full chunks and tail), from position 0."""
        n = common_prefix_length(self.ids, ids)
        if n == self.length and self.tail_ids:
            n += common_prefix_length(self.tail_ids, ids[n:])
        return n

    def has(self, ids: list[int], chunk: int) -> bool:
        """Every state `ids` needs is here, computed exactly as a cold encode would."""
        full = len(ids) // chunk * chunk
        if full > self.length or self.ids[:full] != ids[:full]:
            return False
        rest = ids[full:]
        return not rest or (full == self.length and self.tail_ids == rest)

    def states(self, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer states of the first `n` positions (views; `n` may reach into the tail)."""
        if n <= self.length:
            self.watermark = max(self.watermark, n)
            return [k[..., :n, :] for k in self.keys], [v[..., :n, :] for v in self.values]
        t = n - self.length
        if not self.keys:  # a strip shorter than one chunk: only the tail
            return [tk[..., :t, :] for tk in self.tail_keys], [tv[..., :t, :] for tv in self.tail_values]
        self.watermark = max(self.watermark, self.length)
        return ([torch.cat([k[..., : self.length, :], tk[..., :t, :]], dim=-2)
                 for k, tk in zip(self.keys, self.tail_keys)],
                [torch.cat([v[..., : self.length, :], tv[..., :t, :]], dim=-2)
                 for v, tv in zip(self.values, self.tail_values)])

    def truncate(self, n: int) -> None:
        """Drop every state after position `n` (a multiple of the chunk), tail included."""
        del self.ids[n:]
        self.drop_tail()

    def drop_tail(self) -> None:
        self.tail_ids, self.tail_keys, self.tail_values = [], [], []

    def growth(self, n_new: int, bytes_per_token: int, limit: int = 0) -> int:
        """Bytes `append(n_new tokens, limit=limit)` would add (0 when it writes in place)."""
        need = self.length + n_new
        if self.keys and need <= self.capacity and self.length >= self.watermark:
            return 0
        return bytes_per_token * (_grown(self.capacity, need, limit) - self.capacity)

    def append(self, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor], limit: int = 0) -> None:
        """Add full chunks after `length`: `keys[i]` [1, H, len(ids), D]. A new buffer doubles, up to
        `limit` tokens (the longest the strip will get, when known)."""
        n = len(ids)
        need = self.length + n
        if not self.keys:
            self.keys = [_buffer(k, _grown(0, need, limit)) for k in keys]
            self.values = [_buffer(v, _grown(0, need, limit)) for v in values]
        elif need > self.capacity or self.length < self.watermark:
            # Full, or about to overwrite positions a request may still read: a fresh buffer.
            cap = _grown(self.capacity, need, limit)
            self.keys = [_copied(k, self.length, cap) for k in self.keys]
            self.values = [_copied(v, self.length, cap) for v in self.values]
            self.watermark = 0
        for buf, new in zip(self.keys, keys):
            buf[..., self.length : need, :] = new
        for buf, new in zip(self.values, values):
            buf[..., self.length : need, :] = new
        self.ids.extend(ids)
        self.drop_tail()

    def set_tail(self, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.tail_ids = list(ids)
        self.tail_keys = [k.clone() for k in keys]
        self.tail_values = [v.clone() for v in values]



def _grown(capacity: int, need: int, limit: int = 0) -> int:
    """Next buffer size: doubling (so a strip filled chunk by chunk copies O(n) in all), but never
    past `limit` when that is known and enough."""
    size = max(need, 2 * capacity, 64)
    return max(need, min(size, limit)) if limit else size


def _buffer(like: torch.Tensor, capacity: int) -> torch.Tensor:
    b, h, _, d = like.shape
    return torch.empty((b, h, capacity, d), dtype=like.dtype, device=like.device)


def _copied(buf: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    out = _buffer(buf, capacity)
    out[..., :length, :] = buf[..., :length, :]
    return out


# ---------------------------------------------------------------------------------------------- encoding
def encode_chunk(model, cache, ids: list[int], start: int) -> None:
    """Run the encoder over `ids` at positions start.., appending their states to `cache` (1.a / 1.f)."""
    device = model.device
    n = len(ids)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # [1, n]
    position_ids = torch.arange(start, start + n, dtype=torch.int32, device=device).unsqueeze(0)
    attention_mask = torch.ones((1, start + n), dtype=torch.bool, device=device)
    hf.encoder_forward(model, cache, input_ids, position_ids, attention_mask)


def encode_from(model, ids: list[int], strip: Strip | None, reuse: int, chunk: int | None):
    """Encoder cache for `ids`, taking the first `reuse` states from `strip` and encoding the rest.

    The rest is encoded in chunks at multiples of `chunk` (`None`: in one pass, as `generate` does).
    Returns `(cache, new_keys, new_values)`: a batch-1 encoder cache for the decoder, and the states
    of positions reuse.. per layer ([1, H, len(ids) - reuse, D]) for the caller to keep.
    """
    return drain(encode_from_steps(model, ids, strip, reuse, chunk))


def encode_from_steps(model, ids: list[int], strip: Strip | None, reuse: int, chunk: int | None):
    """`encode_from` as a generator that yields after each encoder chunk but the last (the scheduler
    runs other requests' steps in between) and returns its result."""
    if strip is not None and reuse > 0:
        keys, values = strip.states(reuse)
        cache = hf.cache_from_states(model, keys, values, reuse)
    else:
        cache = hf.new_cache(model)
    n_new = len(ids) - reuse
    if n_new == 0:
        return cache, [], []
    step = chunk or n_new
    hf.start_recording(cache)  # sliding layers keep the new states until `stop_recording` below
    for start in range(reuse, len(ids), step):
        if start > reuse:
            yield
        encode_chunk(model, cache, ids[start : start + step], start)
    new_keys = [k[..., -n_new:, :] for k, _ in hf.layer_states(cache)]
    new_values = [v[..., -n_new:, :] for _, v in hf.layer_states(cache)]
    hf.stop_recording(cache)  # sliding layers back to their window, as after a plain encoder pass
    return cache, new_keys, new_values


def drain(steps):
    """Run a generator of work pieces to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def encode_prefix(model, prefix_ids: list[int], strip: Strip | None = None, chunk: int | None = None):
    """Encode `prefix_ids`, reusing `strip` up to the LCP floored to a chunk; returns (cache, n_encoded).

    Without a strip and `chunk=None` this is one encoder pass over the prefix, exactly as
    `model.generate` encodes its prompt (requests without a session).
    """
    reuse = 0
    if strip is not None and chunk:
        reuse = min(strip.lcp(prefix_ids), len(prefix_ids)) // chunk * chunk
        reuse = min(reuse, strip.length)
    cache, _, _ = encode_from(model, prefix_ids, strip, reuse, chunk)
    return cache, len(prefix_ids) - reuse


def _split(new: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
    return [t[..., start:stop, :] for t in new]


# ---------------------------------------------------------------------------------------------- the store
@dataclass
class _Document:
    strips: dict[Hashable, Strip] = field(default_factory=dict)
    last_used: int = 0


class CacheStore:
    """Every document's strips, within `budget_bytes`; documents are evicted least recently used.

    Not thread-safe: the engine calls it under its lock. `chunk` is the encoder's chunk
    (`Settings.prefix_chunk`); `margin` tokens at the end of a request's prefix may be the cursor's own
    tokenization (a word cut in half), not an edit.
    """

    def __init__(self, budget_bytes: int, chunk: int, bytes_per_token: int, margin: int | None = None):
        self.budget_bytes = budget_bytes
        self.chunk = chunk
        self.bytes_per_token = bytes_per_token
        self.margin = margin if margin is not None else max(chunk // 4, 1)
        self._docs: OrderedDict[str, _Document] = OrderedDict()
        self._ticks = itertools.count(1)  # recency of strips and documents
        # {session: {"strips", "tokens", "bytes"}} from least to most recently used, replaced whole after
        # every change, so stats can read it without the engine's lock (held through a denoising step).
        self.summary: dict[str, dict] = {}

    def _publish(self, session: str | None = None) -> None:
        summary = {s: self.summary.get(s) for s in self._docs}
        if session is not None and session in self._docs:
            summary[session] = self.info(session)
        self.summary = {s: v if v is not None else self.info(s) for s, v in summary.items()}

    # ------------------------------------------------------------------ bookkeeping
    def nbytes(self, session: str | None = None) -> int:
        docs = self._docs.values() if session is None else [self._docs[session]] if session in self._docs else []
        return sum(s.nbytes() for d in docs for s in d.strips.values())

    def sessions(self) -> list[str]:
        """Documents from least to most recently used."""
        return list(self._docs)

    def info(self, session: str) -> dict:
        doc = self._docs.get(session)
        strips = list(doc.strips.values()) if doc else []
        return {"strips": len(strips), "tokens": sum(s.length + len(s.tail_ids) for s in strips),
                "bytes": sum(s.nbytes() for s in strips)}

    def tick(self) -> int:
        """A recency tick later than every strip's `last_used` so far."""
        return next(self._ticks)

    def strip(self, session: str, key: Hashable) -> Strip | None:
        """The strip of window `key` in document `session`, if any (read it under the engine's lock)."""
        doc = self._docs.get(session)
        return doc.strips.get(key) if doc is not None else None

    def touch(self, session: str) -> None:
        """`session` is the document the user works in now: the last to be evicted."""
        doc = self._docs.setdefault(session, _Document())
        doc.last_used = self.tick()
        self._docs.move_to_end(session)
        self._publish(session)

    def forget(self, session: str) -> None:
        self._docs.pop(session, None)
        self._publish()

    def keep_only(self, session: str, keys: set, since: int) -> None:
        """Drop strips of `session` not in `keys` that no request has read since tick `since`."""
        doc = self._docs.get(session)
        if doc is None:
            return
        for key in [k for k, s in doc.strips.items() if k not in keys and s.last_used < since]:
            del doc.strips[key]
        self._publish(session)

    def _make_room(self, session: str, nbytes: int, keep: Strip, own_strips: bool) -> bool:
        """Free bytes until `nbytes` more fit: documents used less recently than `session` first (least
        recently used first), then, when `own_strips`, the least recently read strips of `session`
        itself (never `keep`)."""
        total = self.nbytes()
        for other in list(self._docs):
            if total + nbytes <= self.budget_bytes or other == session:
                break
            total -= self.nbytes(other)
            del self._docs[other]
        doc = self._docs.get(session)
        if own_strips and doc is not None:
            for key, strip in sorted(doc.strips.items(), key=lambda kv: kv[1].last_used):
                if total + nbytes <= self.budget_bytes:
                    break
                if strip is not keep:
                    total -= strip.nbytes()
                    del doc.strips[key]
        return total + nbytes <= self.budget_bytes

    def _strip(self, session: str, key: Hashable, ids: list[int]) -> Strip:
        """The strip for (session, key); a new one starts as a copy of the chunks it shares with the
        best other strip of the document (other lead text before the same code, repeated text)."""
        doc = self._docs.setdefault(session, _Document())
        strip = doc.strips.get(key)
        if strip is not None:
            return strip
        strip = Strip()
        best, best_lcp = None, 0
        for other in doc.strips.values():
            n = common_prefix_length(other.ids, ids)
            if n > best_lcp:
                best, best_lcp = other, n
        shared = best_lcp // self.chunk * self.chunk
        if best is not None and shared > 0:
            keys, values = best.states(shared)
            strip.append(best.ids[:shared], keys, values)
        doc.strips[key] = strip
        return strip

    # ------------------------------------------------------------------ requests
    def encode(self, model, session: str, key: Hashable, ids: list[int], limit: int = 0):
        """Encoder cache for a request's prefix `ids` in window `key` of document `session`.

        Uses the window's strip up to the LCP (floored to a chunk) and encodes the rest in chunks.
        The strip takes the new full chunks (and the partial tail) only when that destroys nothing
        still valid: when the request extends the strip, or when it differs from the strip more than
        `margin` tokens before its end (an edit before the cursor: the old states after it are stale).
        A request at a cursor inside the strip leaves it as it is. `limit`: the longest prefix a
        request in this window can have (buffer sizing). Returns (cache, n_encoded).
        """
        return drain(self.encode_steps(model, session, key, ids, limit))

    def encode_steps(self, model, session: str, key: Hashable, ids: list[int], limit: int = 0):
        """`encode` as a generator that yields between encoder chunks (see `encode_from_steps`)."""
        chunk = self.chunk
        self.touch(session)
        strip = self._strip(session, key, ids)
        strip.last_used = self.tick()
        if strip.has(ids, chunk):
            keys, values = strip.states(len(ids))
            return hf.cache_from_states(model, keys, values, len(ids)), 0
        lcp = strip.lcp(ids)
        reuse = min(lcp, strip.length) // chunk * chunk
        cache, new_keys, new_values = yield from encode_from_steps(model, ids, strip, reuse, chunk)
        extends = strip.length <= reuse
        edited = lcp < len(ids) - self.margin
        if extends or edited:
            full = (len(ids) - reuse) // chunk * chunk
            strip.truncate(reuse)
            need = (strip.growth(full, self.bytes_per_token, limit)
                    + self.bytes_per_token * (len(ids) - reuse - full))
            if self._make_room(session, need, strip, own_strips=True):
                if full:
                    strip.append(ids[reuse : reuse + full], _split(new_keys, 0, full), _split(new_values, 0, full),
                                 limit)
                if len(ids) > reuse + full:
                    strip.set_tail(ids[reuse + full :], _split(new_keys, full, None), _split(new_values, full, None))
            self._publish(session)
        return cache, len(ids) - reuse

    # ------------------------------------------------------------------ idle prefill
    def prefill_step(self, model, session: str, key: Hashable, ids: list[int], tail: bool) -> int:
        """Encode the next missing piece of window `key` = `ids`: one chunk, or the partial tail at
        the end (only with `tail`: the window ends where the document ends, a likely cursor).

        The strip is cut at its first difference from `ids` (the document changed there) and grown
        from there. Returns the tokens encoded: 0 when the window is complete, -1 when the budget is
        full (prefill never evicts the document's own strips, only less recently used documents).
        """
        chunk = self.chunk
        if session not in self._docs:
            self.touch(session)
        strip = self._strip(session, key, ids)
        full_len = len(ids) // chunk * chunk
        want = ids if tail else ids[:full_len]
        if not want or strip.has(want, chunk):
            return 0
        lcp = min(strip.lcp(want), strip.length)
        reuse = lcp // chunk * chunk
        strip.truncate(reuse)
        stop = min(reuse + chunk, len(want))
        piece = want[reuse:stop]
        need = (strip.growth(len(piece), self.bytes_per_token, full_len) if len(piece) == chunk
                else self.bytes_per_token * len(piece))
        if not self._make_room(session, need, strip, own_strips=False):
            return -1
        _, new_keys, new_values = encode_from(model, want[:stop], strip, reuse, chunk)
        if len(piece) == chunk:
            strip.append(piece, new_keys, new_values, full_len)
        else:
            strip.set_tail(piece, new_keys, new_values)
        self._publish(session)
        return len(piece)
