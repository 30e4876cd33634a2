"""Canvas layouts for masked-span conditioning.

A row of the canvas is `[middle slots | clamped suffix head | batch pad]`. Positions run on from the
prefix without a gap, so every middle slot attends bidirectionally to the suffix head, and the
suffix head sits where it would sit if the middle had exactly that many tokens. Several candidate
middle lengths share one batch; the pad at the end of shorter rows is masked out of attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    slot_lengths: tuple[int, ...]  # middle slots per row
    clamped: torch.Tensor  # [B, L] bool: suffix-head positions (never renoised, never resampled)
    clamped_ids: torch.Tensor  # [B, L] long: their token ids (pad elsewhere)
    valid: torch.Tensor  # [B, L] bool: real positions (False = batch pad)
    middle: torch.Tensor  # [B, L] bool: middle slots
    position_ids: torch.Tensor  # [B, L] int32
    attention_mask: torch.Tensor | None  # [B, P + L] bool, None when every position is real

    @property
    def width(self) -> int:
        return self.clamped.shape[1]

    @property
    def candidates(self) -> torch.Tensor:
        """Positions the sampler may accept and renoise.  [B, L]"""
        return self.valid & ~self.clamped

    @property
    def any_fixed(self) -> bool:
        """True when some positions are clamped or pad (plain generate-style canvases have none)."""
        return len(self.slot_lengths) > 1 or bool(self.clamped.any()) or not bool(self.valid.all())


def infill_layout(
    prefix_len: int, slot_lengths: list[int], suffix_head: list[int], pad_id: int, device
) -> Layout:
    """Rows of `slot_lengths[i]` middle slots followed by the clamped `suffix_head`."""
    s = len(suffix_head)
    width = max(slot_lengths) + s
    b = len(slot_lengths)
    clamped = torch.zeros((b, width), dtype=torch.bool)
    clamped_ids = torch.full((b, width), pad_id, dtype=torch.long)
    valid = torch.zeros((b, width), dtype=torch.bool)
    middle = torch.zeros((b, width), dtype=torch.bool)
    head = torch.tensor(suffix_head, dtype=torch.long)
    for row, m in enumerate(slot_lengths):
        middle[row, :m] = True
        valid[row, : m + s] = True
        if s:
            clamped[row, m : m + s] = True
            clamped_ids[row, m : m + s] = head
    position_ids = torch.arange(prefix_len, prefix_len + width, dtype=torch.int32).unsqueeze(0).expand(b, -1)
    attention_mask = None
    if not bool(valid.all()):
        attention_mask = torch.cat([torch.ones((b, prefix_len), dtype=torch.bool), valid], dim=1)
        attention_mask = attention_mask.to(device)
    return Layout(
        slot_lengths=tuple(slot_lengths),
        clamped=clamped.to(device),
        clamped_ids=clamped_ids.to(device),
        valid=valid.to(device),
        middle=middle.to(device),
        position_ids=position_ids.contiguous().to(device),
        attention_mask=attention_mask,
    )


def candidate_lengths(max_new_tokens: int, minimum: int = 8) -> list[int]:
    """Middle lengths to try when the editor cannot say how long the middle is: N, N/2, N/4, ... >= minimum."""
    lengths = [max_new_tokens]
    n = max_new_tokens // 2
    while n >= minimum:
        lengths.append(n)
        n //= 2
    return sorted(set(lengths))


def middle_end(row_ids: list[int], stop_ids: set[int]) -> tuple[int, bool]:
    """Index where the middle ends in a row of slot tokens, and whether a stop token ended it."""
    for i, t in enumerate(row_ids):
        if t in stop_ids:
            return i, True
    return len(row_ids), False
