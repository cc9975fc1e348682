"""The paged KV pool of one DP rank: the pool tensor and its page allocator.

`KvPool` owns ONE tensor `kv` of shape [num_layers, 2, num_pages, page_size, num_kv_heads,
head_dim] (see layout.py) and an allocator with exact accounting: every page is either free or
allocated, `alloc(n)` is all-or-nothing (RESOURCE_EXHAUSTED when fewer than n pages are free),
`free(ids)` refuses a page that is not allocated (a double free, or an id never handed out) and
then changes nothing. `is_full()` says every page is back, which tests use to prove nothing leaked.

Pages are handed out as contiguous runs where the free pages allow: the free pages are kept as
runs (start -> length, merged with their neighbours on free; also indexed by length, so best
fit is a bisection), and `alloc(n)` takes the smallest free run that holds all n pages (best
fit, lowest start on ties), else the longest runs first until n are taken. A request whose pages
form one run travels in place, without pack or unpack (worker/transfer/runs.py); `free_runs()`
reports the fragmentation (bench/transfer.py).

`KvPool(..., shared=True)` puts a CPU pool's tensor in shared memory that a prefill rank of the
same host maps and writes into (worker/kv/shm_pool.py; CUDA pools are shareable as they are).

The allocator is guarded by a lock, so the rank's event loop and its worker threads (pack and
unpack run in threads) may share a pool; the tensor itself is not locked: whoever holds a page
owns its bytes.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Iterable

import torch

from pdmesh.errors import InvalidArgument, ResourceExhausted
from pdmesh.reasons import Reason
from pdmesh.worker.kv.layout import KvLayout


class KvPool:
    """A rank's KV pages and their allocator."""

    def __init__(self, layout: KvLayout, num_pages: int, device: str | torch.device = "cpu", *,
                 shared: bool = False) -> None:
        if not isinstance(num_pages, int) or num_pages < 1:
            raise InvalidArgument(f"a KV pool needs at least one page, got {num_pages!r}",
                                  reason=Reason.INVALID_KV_POOL, metadata={"num_pages": num_pages})
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
        # Free pages as runs: start -> length, and end (exclusive) -> start for merging.
        # A fresh pool is one run and hands out 0, 1, 2, ...
        self._runs: dict[int, int] = {0: num_pages}
        self._ends: dict[int, int] = {num_pages: 0}
        # The same runs as (length, start), sorted: best fit is one bisection, not a scan of
        # every free run (decode growth allocates a page at a time, often in a fragmented pool).
        self._by_size: list[tuple[int, int]] = [(num_pages, 0)]
        self._allocated: set[int] = set()

    @property
    def num_free(self) -> int:
        with self._lock:
            return self.num_pages - len(self._allocated)

    def free_runs(self) -> list[int]:
        """Lengths of the free runs, in page order."""
        with self._lock:
            return [self._runs[start] for start in sorted(self._runs)]

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
                                  reason=Reason.INVALID_PAGE_COUNT)
        with self._lock:
            free = self.num_pages - len(self._allocated)
            if n > free:
                raise ResourceExhausted(
                    f"KV pool has {free} free pages of {self.num_pages}, {n} asked; "
                    "retry when requests finish or give the rank more pages",
                    reason=Reason.KV_POOL_EXHAUSTED,
                    metadata={"requested": n, "free": free, "total": self.num_pages})
            ids = self._take(n)
            self._allocated.update(ids)
            return ids

    def _take(self, n: int) -> list[int]:
        """n pages from the free runs (lock held; n <= free pages)."""
        if n == 0:
            return []
        fit = bisect.bisect_left(self._by_size, (n, -1))
        if fit < len(self._by_size):  # the smallest run that holds n, lowest start on ties
            start = self._by_size[fit][1]
            self._cut(start, n)
            return list(range(start, start + n))
        ids: list[int] = []
        while len(ids) < n:  # no run fits: the longest runs first, lowest start on ties
            length = self._by_size[-1][0]
            lo = bisect.bisect_left(self._by_size, (length, -1))
            group = self._by_size[lo:]  # every free run of this length, by start
            whole = min(len(group), (n - len(ids)) // length)
            for _, start in group[:whole]:
                del self._runs[start], self._ends[start + length]
                ids.extend(range(start, start + length))
            del self._by_size[lo:lo + whole]
            if len(ids) < n and whole < len(group):  # the rest from the next run of them
                start, take = group[whole][1], n - len(ids)
                self._cut(start, take)
                ids.extend(range(start, start + take))
        return ids

    def _cut(self, start: int, n: int) -> None:
        """Take the first n pages of the free run at `start`."""
        length = self._runs.pop(start)
        del self._ends[start + length]
        self._unindex(start, length)
        if n < length:
            self._runs[start + n] = length - n
            self._ends[start + length] = start + n
            bisect.insort(self._by_size, (length - n, start + n))

    def _put(self, start: int, n: int) -> None:
        """Return pages [start, start + n) to the free runs, merged with their neighbours."""
        end = start + n
        if start in self._ends:  # a free run ends where this one starts
            start = self._ends.pop(start)
            self._unindex(start, self._runs[start])
        if end in self._runs:  # a free run starts where this one ends
            tail = self._runs.pop(end)
            del self._ends[end + tail]
            self._unindex(end, tail)
            end += tail
        self._runs[start] = end - start
        self._ends[end] = start
        bisect.insort(self._by_size, (end - start, start))

    def _unindex(self, start: int, length: int) -> None:
        del self._by_size[bisect.bisect_left(self._by_size, (length, start))]

    def free(self, ids: Iterable[int]) -> None:
        """Return pages; any id not allocated (double free, never allocated) changes nothing."""
        ids = list(map(int, ids))
        with self._lock:
            distinct = set(ids)
            if len(distinct) != len(ids) or not distinct <= self._allocated:
                bad = sorted(distinct - self._allocated)
                dup = sorted(i for i, k in Counter(ids).items() if k > 1)
                raise InvalidArgument(
                    f"cannot free KV pages that are not allocated {bad[:8]} or repeated {dup[:8]}; "
                    "nothing was freed (a double free, or ids from another pool)",
                    reason=Reason.KV_PAGE_NOT_ALLOCATED,
                    metadata={"not_allocated": bad[:32], "repeated": dup[:32]})
            self._allocated -= distinct
            for start, n in _segments(sorted(distinct)):
                self._put(start, n)

    def __repr__(self) -> str:
        return (f"KvPool({self.layout}, num_pages={self.num_pages}, device={self.device}, "
                f"free={self.num_free})")


def _segments(ids: list[int]) -> list[tuple[int, int]]:
    """(start, length) of the runs of consecutive ids in a sorted list."""
    out: list[tuple[int, int]] = []
    if not ids:
        return out
    start = prev = ids[0]
    for i in ids[1:]:
        if i != prev + 1:
            out.append((start, prev + 1 - start))
            start = i
        prev = i
    out.append((start, prev + 1 - start))
    return out
