"""Reusable staging buffers for pack/unpack and UCX.

A fresh buffer costs its page faults on first touch (about 0.1-0.7 GB/s here, against 10+ GB/s
for a copy into touched memory), so buffers are kept and reused: `take(nbytes)` returns a uint8
tensor of exactly `nbytes` (a view of a cached buffer whose size is a power of two, at least
64 KiB), `give(buf)` returns it. At most `max_bytes` are kept; past that a returned buffer is
dropped. Used from one event loop thread only.
"""

from __future__ import annotations

from collections import defaultdict

import torch

_MIN_BUCKET = 1 << 16


class StagingCache:
    def __init__(self, max_bytes: int, device: str | torch.device = "cpu") -> None:
        self.max_bytes = max_bytes
        self.device = torch.device(device)
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._cached = 0
        self._lent: dict[int, torch.Tensor] = {}  # id() of a lent view -> its whole buffer

    @property
    def cached_bytes(self) -> int:
        return self._cached

    @property
    def lent(self) -> int:
        return len(self._lent)

    def take(self, nbytes: int) -> torch.Tensor:
        size = max(_MIN_BUCKET, 1 << max(0, nbytes - 1).bit_length())
        bucket = self._free[size]
        if bucket:
            whole = bucket.pop()
            self._cached -= size
        else:
            whole = torch.empty(size, dtype=torch.uint8, device=self.device)
        view = whole[:nbytes]
        self._lent[id(view)] = whole
        return view

    def give(self, view: torch.Tensor) -> None:
        whole = self._lent.pop(id(view), None)
        if whole is None:
            raise ValueError("staging buffer was not taken from this cache (or given back twice)")
        size = whole.numel()
        if self._cached + size <= self.max_bytes:
            self._free[size].append(whole)
            self._cached += size

    def clear(self) -> None:
        self._free.clear()
        self._cached = 0
