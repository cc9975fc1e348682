"""The transfer checksum, computed on the bytes where they lie and folded once at the end.

The value is wire.py's: each message's block checksum (`wire.checksum`, 4 KiB blocks of 64-bit
words summed, then combined with their positions) folded in plan order (`wire.fold`). What
differs is when the host sees it: `parts(data)` returns the two 64-bit sums of one message as a
tensor on the data's device, with no host synchronisation (on a GPU the reduction is queued on
the current stream behind the pack or the receive it checks), and `Digest.value()` reads every
part once and folds them. It reads views of pool pages in place (a direct message) as well as
staging buffers: one vectorised read pass per side, no copy.
"""

from __future__ import annotations

import torch

from pdmesh.worker.transfer import wire

_BLOCK_WORDS = 512
_GOLDEN = 0x9E3779B97F4A7C15


def parts(data: torch.Tensor) -> torch.Tensor:
    """(sum of block sums, positional sum) of a contiguous uint8 tensor, as int64 [2] on its
    device; `combine(parts, n)` gives `wire.checksum(data)`."""
    flat = data.reshape(-1)
    n = flat.numel()
    if n % 8:  # sizes of no whole words (tiny test layouts only): the value itself
        value = wire.checksum(flat)
        return torch.tensor([_signed(value), 0], dtype=torch.int64, device=flat.device)
    if flat.storage_offset() % 8:  # word views need 8-byte alignment
        flat = flat.clone()
    words = flat.view(torch.int64)
    full = words.numel() // _BLOCK_WORDS
    sums = words[: full * _BLOCK_WORDS].view(full, _BLOCK_WORDS).sum(dim=1)
    if words.numel() > full * _BLOCK_WORDS:
        sums = torch.cat([sums, words[full * _BLOCK_WORDS:].sum().reshape(1)])
    weights = torch.arange(1, sums.numel() + 1, dtype=torch.int64, device=sums.device)
    return torch.stack([sums.sum(), (sums * weights).sum()])


def combine(sums: tuple[int, int], n: int) -> int:
    total, positional = sums
    if n % 8:
        return total & wire.MASK64
    if n == 0:
        return 0
    return ((total & wire.MASK64) + (positional & wire.MASK64) * _GOLDEN + n) & wire.MASK64


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class Digest:
    """Message checksums of one transfer in plan order; `value()` folds them (one host sync)."""

    def __init__(self) -> None:
        self._parts: list[tuple[torch.Tensor, int]] = []

    def add(self, data: torch.Tensor) -> None:
        self._parts.append((parts(data), data.numel()))

    def add_parts(self, sums: torch.Tensor, n: int) -> None:
        self._parts.append((sums, n))

    def __len__(self) -> int:
        return len(self._parts)

    def value(self) -> int:
        acc = wire.FOLD_START
        if not self._parts:
            return acc
        values = torch.stack([p.to("cpu", non_blocking=False) for p, _ in self._parts]).tolist()
        for (total, positional), (_, n) in zip(values, self._parts):
            acc = wire.fold(acc, combine((total, positional), n))
        return acc
