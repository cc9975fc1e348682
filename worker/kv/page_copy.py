"""Copy a request's pages from one pool tensor straight into another's, with its checksum.

    plan = CopyPlan(src_ids, dst_ids)                      # once per transfer
    value = copy_pages(src_kv, dst_kv, plan, a, b)         # layers [a, b): one pass, one checksum

The same-host transfer (worker/transfer/samehost.py) writes a prefill pool's pages into a decode
pool mapped into the prefill's process. Both pools have one layout (layout.py); page
`src_ids[j]` of layers [a, b) lands in page `dst_ids[j]`. The checksum is taken in the same pass
as the copy, over the bytes copied, so it costs no extra pass over memory:

    rows r = (layer * 2 + kv) * n + j   (the whole request's staging order, DESIGN.md)
    checksum of layers [a, b) = sum over their rows of rowsum(r) * (2 r + 1)   mod 2^64

where rowsum adds the row's bytes read as little-endian integer words (the widest of 8/4/2/1
bytes that divides a row), so a changed, lost or misplaced row changes it. The weights follow the
row's place in the whole request, so the checksums of any cut into layer ranges add up (mod
2^64) to the whole request's: the writer may chunk as suits its device.

CPU: one compiled loop per chunk (worker/kv/copy_numba.py) reads each word once, stores it and
adds it to its row's sum: one pass, the GIL released; `streaming=True` (a copy far larger than
the cache: the same-host writer's threaded slices) stores with non-temporal stores. The torch
version here is the reference
(and the fallback without numba): pages consecutive on both sides form runs, and each run of
every layer of the chunk is one strided `copy_` plus one `sum` (random ids: one run per page).
CUDA: one Triton kernel launch per chunk (worker/kv/copy_triton.py), the row sums reduced in
the same kernel.
"""

from __future__ import annotations

import torch

from pdmesh.worker.kv import copy_numba

MASK64 = (1 << 64) - 1
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


class CopyPlan:
    """The page pairs of one request, as runs (j0, s0, d0, k): request pages j0..j0+k-1 are
    source pages s0.. and destination pages d0.., each consecutive."""

    def __init__(self, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
        if src_ids.numel() != dst_ids.numel():
            raise ValueError("source and destination page counts differ")
        self.src_ids = src_ids.to(torch.int64).contiguous()
        self.dst_ids = dst_ids.to(torch.int64).contiguous()
        self.n = src_ids.numel()
        self._order: torch.Tensor | None = None
        self._runs: list[tuple[int, int, int, int]] | None = None
        self._weights: dict[tuple[int, str], torch.Tensor] = {}

    @property
    def order(self) -> torch.Tensor:
        """The request's pages by source page (the compiled CPU copy's reading order), made on
        first use."""
        if self._order is None:
            self._order = torch.argsort(self.src_ids)
        return self._order

    @property
    def runs(self) -> list[tuple[int, int, int, int]]:
        """The runs (made on first use: only the torch copy walks them)."""
        if self._runs is None:
            s, d = self.src_ids.tolist(), self.dst_ids.tolist()
            runs: list[tuple[int, int, int, int]] = []
            for j in range(self.n):
                if runs and s[j] == s[j - 1] + 1 and d[j] == d[j - 1] + 1:
                    j0, s0, d0, k = runs[-1]
                    runs[-1] = (j0, s0, d0, k + 1)
                else:
                    runs.append((j, s[j], d[j], 1))
            self._runs = runs
        return self._runs

    def weights(self, a: int, b: int, device: torch.device) -> torch.Tensor:
        """Row weights of layers [a, b): 2 r + 1, r the row's place in the whole request."""
        key = (a, b, str(device))
        found = self._weights.get(key)
        if found is None:
            found = _weights(a, b, self.n, device)
            self._weights[key] = found
        return found


def _weights(a: int, b: int, n: int, device) -> torch.Tensor:
    first = 2 * a * n
    return (2 * torch.arange(first, first + (b - a) * 2 * n, dtype=torch.int64, device=device)
            + 1).view(b - a, 2, n)


def word_dtype(kv: torch.Tensor) -> torch.dtype:
    """The integer word the checksum reads a row in (the widest dividing a row's bytes)."""
    row_bytes = kv[0, 0, 0].numel() * kv.element_size()
    return next(w for n, w in _WORDS if row_bytes % n == 0)


def _words(kv: torch.Tensor) -> torch.Tensor:
    """The pool as [layers, 2, pages, words] of its checksum word."""
    num_layers, _, num_pages = kv.shape[:3]
    return kv.view(torch.uint8).view(num_layers, 2, num_pages, -1).view(word_dtype(kv))


def copy_pages(src_kv: torch.Tensor, dst_kv: torch.Tensor, plan: CopyPlan, a: int, b: int,
               checksum: bool = True, streaming: bool = False) -> int:
    """Copy layers [a, b) of the plan's pages from `src_kv` into `dst_kv`; return the checksum
    (0 with `checksum=False`, CPU only: the bench's copy-alone baseline). `streaming` (CPU,
    compiled loop): non-temporal stores, for copies far larger than the cache. The caller validated
    both pools (same layout, contiguous, ids in range, destination ids distinct). On CUDA the
    copy is finished (its stream synchronized) when this returns."""
    if plan.n == 0 or a == b:
        return 0
    if src_kv.is_cuda:
        from pdmesh.worker.kv import copy_triton

        return copy_triton.copy_pages_triton(src_kv, dst_kv, plan.src_ids, plan.dst_ids, a, b)
    if copy_numba.kernel() is not None:
        return copy_numba.copy_pages_numba(_words(src_kv), _words(dst_kv), plan.src_ids,
                                           plan.dst_ids, plan.order, a, b, checksum, streaming)
    return _copy_torch(src_kv, dst_kv, plan, a, b, checksum)


def warm(kv: torch.Tensor, pages: list[int]) -> None:
    """Compile the CPU copy for this pool's word dtype now (a rank's warm-up; `pages` unused
    there). A CUDA pool's copy is warmed through the copier a transfer runs
    (`samehost_copy.warm`): the Triton kernel is specialized on how its arguments are aligned."""
    if not kv.is_cuda:
        copy_numba.warm(_words(kv))


def _copy_torch(src_kv: torch.Tensor, dst_kv: torch.Tensor, plan: CopyPlan, a: int, b: int,
                checksum: bool = True) -> int:
    """One strided copy per run of pages over every layer of the chunk, then the run's row
    sums while its bytes are still in cache. (A helper thread summing the previous runs was
    tried: on 2 shared cores it lost 40-70% to the GIL hand-offs between the many small ops.)"""
    src, dst = _words(src_kv)[a:b], _words(dst_kv)[a:b]
    sums = torch.empty((b - a, 2, plan.n), dtype=torch.int64)
    for j0, s0, d0, k in plan.runs:
        piece = src[:, :, s0:s0 + k]
        dst[:, :, d0:d0 + k].copy_(piece)
        if checksum:
            torch.sum(piece, -1, dtype=torch.int64, out=sums[:, :, j0:j0 + k])
    if not checksum:
        return 0
    return int((sums * plan.weights(a, b, sums.device)).sum()) & MASK64


def checksum_pages(kv: torch.Tensor, ids: torch.Tensor, a: int, b: int) -> int:
    """The checksum `copy_pages` returns, of pages `ids` of layers [a, b) as they are in `kv`
    (a reader's check, and the reference the tests compare the kernel with)."""
    n = ids.numel()
    if n == 0 or a == b:
        return 0
    rows = _words(kv)[a:b].index_select(2, ids.to(kv.device)).sum(-1, dtype=torch.int64)
    return int((rows * _weights(a, b, n, rows.device)).sum()) & MASK64
