"""The paged KV pool of one DP rank: the pool tensor and its page allocator.

`KvPool` owns ONE tensor `kv` of shape [num_layers, 2, num_pages, page_size, num_kv_heads,
head_dim] (see layout.py) and an allocator with exact accounting: every page is either free or
allocated, `alloc(n)` is all-or-nothing (RESOURCE_EXHAUSTED when fewer than n pages are free),
`free(ids)` refuses a page that is not allocated (a double free, or an id never handed out) and
then changes nothing. `is_full()` says every page is back, which tests use to prove nothing leaked.

`KvPool(..., shared=True)` puts a CPU pool's tensor in shared memory that a prefill rank of the
same host maps and writes into (worker/kv/shm_pool.py; CUDA pools are shareable as they are).

The allocator is guarded by a lock, so the rank's event loop and its worker threads (pack and
unpack run in threads) may share a pool; the tensor itself is not locked: whoever holds a page
owns its bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch

from pdmesh.errors import InvalidArgument, ResourceExhausted
from pdmesh.worker.kv.layout import KvLayout


class KvPool:
    """A rank's KV pages and their allocator."""

    def __init__(self, layout: KvLayout, num_pages: int, device: str | torch.device = "cpu", *,
                 shared: bool = False) -> None:
        if not isinstance(num_pages, int) or num_pages < 1:
            raise InvalidArgument(f"a KV pool needs at least one page, got {num_pages!r}",
                                  reason="INVALID_KV_POOL", metadata={"num_pages": num_pages})
        self.layout = layout
        self.num_pages = num_pages
        self.device = torch.device(device)
        shape = (layout.num_layers, 2, num_pages, layout.page_size, layout.num_kv_heads,
                 layout.head_dim)
        if shared and self.device.type == "cpu":
            from pdmesh.worker.kv.shm_pool import shared_zeros

            self.kv = shared_zeros(shape, layout.dtype)
        else:
            self.kv = torch.zeros(shape, dtype=layout.dtype, device=self.device)
        self._lock = threading.Lock()
        # Lowest ids first: a fresh pool hands out 0, 1, 2, ... (pop from the end of a reversed list).
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._allocated: set[int] = set()

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def num_used(self) -> int:
        with self._lock:
            return len(self._allocated)

    def is_full(self) -> bool:
        """True when every page is back in the pool."""
        with self._lock:
            return not self._allocated

    def alloc(self, n: int) -> list[int]:
        """Take `n` pages (all or nothing); RESOURCE_EXHAUSTED if fewer are free."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise InvalidArgument(f"page count must be a non-negative integer, got {n!r}",
                                  reason="INVALID_PAGE_COUNT")
        with self._lock:
            if n > len(self._free):
                raise ResourceExhausted(
                    f"KV pool has {len(self._free)} free pages of {self.num_pages}, {n} asked; "
                    "retry when requests finish or give the rank more pages",
                    reason="KV_POOL_EXHAUSTED",
                    metadata={"requested": n, "free": len(self._free), "total": self.num_pages})
            ids = [self._free.pop() for _ in range(n)]
            self._allocated.update(ids)
            return ids

    def free(self, ids: Iterable[int]) -> None:
        """Return pages; any id not allocated (double free, never allocated) changes nothing."""
        ids = [int(i) for i in ids]
        with self._lock:
            bad = sorted({i for i in ids if i not in self._allocated})
            if bad or len(set(ids)) != len(ids):
                dup = sorted({i for i in ids if ids.count(i) > 1})
                raise InvalidArgument(
                    f"cannot free KV pages that are not allocated {bad[:8]} or repeated {dup[:8]}; "
                    "nothing was freed (a double free, or ids from another pool)",
                    reason="KV_PAGE_NOT_ALLOCATED",
                    metadata={"not_allocated": bad[:32], "repeated": dup[:32]})
            self._allocated.difference_update(ids)
            self._free.extend(reversed(ids))

    def __repr__(self) -> str:
        return (f"KvPool({self.layout}, num_pages={self.num_pages}, device={self.device}, "
                f"free={self.num_free})")
