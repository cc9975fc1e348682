"""The transfer checksum, computed on the bytes where they lie and folded once at the end.

The value is wire.py's: each message's block checksum (`wire.checksum`, 4 KiB blocks of 64-bit
words summed, then combined with their positions) folded in plan order (`wire.fold`). What
differs is when the host sees it: `parts(data)` returns the two 64-bit sums of one message as a
tensor on the data's device, with no host synchronisation (on a GPU the reduction is queued on
the current stream behind the pack or the receive it checks), and `Digest.value()` reads every
part once and folds them. It reads views of pool pages in place (a direct message) as well as
staging buffers: one vectorised read pass per side, no copy. A packed message's parts come from
the pack (sender) or unpack (receiver) itself where a fused kernel exists (`pack_parts`,
`unpack_parts`, through kv/pack.py's `summed`: worker/kv/pack_numba.py on the CPU, the Triton
kernels' summed variants on a GPU): no second pass over its bytes. A message in place in a CPU
pool is summed on its own as it completes (`message_parts`, kv/sum_numba.py).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from pdmesh.worker.kv import sum_numba
from pdmesh.worker.kv.pack import pack_checked, unpack_checked
from pdmesh.worker.transfer import wire

log = logging.getLogger(__name__)


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
    if n == 0:
        return torch.zeros(2, dtype=torch.int64, device=flat.device)
    return rows_parts(flat.view(1, n))[0]


def message_parts(data: torch.Tensor, out: np.ndarray, row: int) -> None:
    """`parts(data)` of one contiguous uint8 message on the CPU, written as uint64 into
    `out[row]` (`out`: [k, 2] uint64): one compiled pass (kv/sum_numba.py) where numba runs and
    the message is whole, aligned 64-bit words, else `parts`. For a message in place just sent
    or just landed (streams.MessageSums): no op calls, and fast where its bytes are in cache."""
    run = sum_numba.kernel()
    n = data.numel()
    if (run is None or data.is_cuda or not n or n % 8 or data.data_ptr() % 8
            or data.storage_offset() % 8):  # word views need both aligned
        out[row] = parts(data).cpu().numpy().view(np.uint64)
        return
    run(data.view(torch.int64).numpy(), wire.BLOCK_WORDS, out, row)


def rows_parts(rows: torch.Tensor) -> torch.Tensor:
    """`parts` of many equal-sized messages at once: `rows` is [..., nbytes] uint8 whose last
    dimension is contiguous (e.g. one page run's blocks of several layers and K/V: a strided
    view of the pool). Returns int64 [..., 2], entry i equal to `parts(rows[i])`: one reduction
    for a whole chunk instead of ~10 small ops per message (they cost as much as the sums)."""
    n, lead = rows.shape[-1], tuple(rows.shape[:-1])
    if n % 8 or rows.storage_offset() % 8 or any(s % 8 for s in rows.stride()[:-1]):
        flat = rows.reshape(-1, n)
        if not flat.shape[0]:
            return torch.zeros(lead + (2,), dtype=torch.int64, device=rows.device)
        return torch.stack([parts(row) for row in flat]).view(lead + (2,))
    words = rows.view(torch.int64)
    count = n // 8
    block = wire.BLOCK_WORDS
    full = count // block
    sums = words[..., : full * block].unflatten(-1, (full, block)).sum(-1)
    if count > full * block:
        sums = torch.cat([sums, words[..., full * block:].sum(-1, keepdim=True)], -1)
    weights = torch.arange(1, sums.shape[-1] + 1, dtype=torch.int64, device=sums.device)
    return torch.stack([sums.sum(-1), (sums * weights).sum(-1)], -1)


def pack_parts(kv: torch.Tensor, ids: torch.Tensor, a: int, b: int, buf: torch.Tensor
               ) -> torch.Tensor:
    """Pack layers [a, b) of pool pages `ids` into the staging buffer `buf` (contiguous uint8,
    [b - a, 2, n] pages) and return `parts(buf)`, in the pack's own pass where it can."""
    sums = pack_checked(kv, ids, a, b, _staged(kv, ids, a, b, buf), summed=_summed_ok(kv))
    return parts(buf) if sums is None else sums


def unpack_parts(buf: torch.Tensor, kv: torch.Tensor, ids: torch.Tensor, a: int, b: int
                 ) -> torch.Tensor:
    """`parts(buf)`, then unpack `buf` into layers [a, b) of pool pages `ids`: one pass where
    it can."""
    sums = unpack_checked(_staged(kv, ids, a, b, buf), kv, ids, a, b, summed=_summed_ok(kv))
    return parts(buf) if sums is None else sums  # the unpack leaves `buf` as it was


def _summed_ok(kv: torch.Tensor) -> bool:
    """Whether a pack/unpack of this pool may take its checksum in the kernel's own pass: on a
    CUDA pool, once this process saw the Triton kernels' sums equal `parts` (checked on first
    use, which a rank's warm-up makes); elsewhere the kernels ignore it."""
    return not kv.is_cuda or _summed_kernels_agree(kv.device)


@functools.cache
def _summed_kernels_agree(device: torch.device) -> bool:
    """One check per device and process of the summed Triton pack and unpack against `parts`
    and torch's indexing, on random bits whose rows start inside a 512-word block and span
    several: a kernel that fails or disagrees is not used (the transfer then packs and sums in
    two passes, as before it existed), and the rank says so in its log."""
    try:
        gen = torch.Generator().manual_seed(7)
        kv = torch.empty((2, 2, 6, 4, 2, 128), dtype=torch.bfloat16)
        kv.view(torch.uint8).random_(generator=gen)
        kv = kv.to(device)
        ids = torch.tensor([4, 1, 3], dtype=torch.int64, device=device)
        out = torch.empty((2, 2, 3, 4, 2, 128), dtype=kv.dtype, device=device)
        packed = pack_checked(kv, ids, 0, 2, out, summed=True)
        target = torch.zeros_like(kv)
        unpacked = unpack_checked(out, target, ids, 0, 2, summed=True)
        if packed is None or unpacked is None:  # no summed kernels here (no Triton)
            return False
        bits = out.view(torch.int16)  # random bits hold NaNs: compared as integers
        want = parts(out.view(-1).view(torch.uint8))
        agree = (torch.equal(bits, kv[:, :, ids].view(torch.int16))
                 and torch.equal(bits, target[:, :, ids].view(torch.int16))
                 and torch.equal(packed, want) and torch.equal(unpacked, want))
    except Exception:  # noqa: BLE001 - any failure means: do not use them
        log.warning("the fused pack/unpack checksum kernels failed their check on %s; KV "
                    "transfers sum in a second pass", device, exc_info=True)
        return False
    if not agree:
        log.warning("the fused pack/unpack checksum kernels disagree with digest.parts on %s; "
                    "KV transfers sum in a second pass", device)
    return agree


def _staged(kv: torch.Tensor, ids: torch.Tensor, a: int, b: int, buf: torch.Tensor
            ) -> torch.Tensor:
    return buf.view(kv.dtype).view((b - a, 2, ids.numel()) + tuple(kv.shape[3:]))


def combine(sums: tuple[int, int], n: int) -> int:
    total, positional = sums
    if n % 8:
        return total & wire.MASK64
    if n == 0:
        return 0
    return wire.combine(total, positional, n)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class Digest:
    """Message checksums of one transfer in plan order; `value()` folds them (one host sync)."""

    def __init__(self) -> None:
        self._parts: list[tuple[torch.Tensor, int]] = []

    def add(self, data: torch.Tensor) -> None:
        self.add_parts(parts(data), data.numel())

    def add_parts(self, sums: torch.Tensor, n: int) -> None:
        self._parts.append((sums.view(1, 2), [n]))

    def add_rows(self, sums: torch.Tensor, sizes: list[int]) -> None:
        """Parts of several messages in plan order: `sums` [k, 2], `sizes` their byte counts."""
        self._parts.append((sums.view(-1, 2), list(sizes)))

    def __len__(self) -> int:
        return sum(len(sizes) for _, sizes in self._parts)

    def value(self) -> int:
        acc = wire.FOLD_START
        if not self._parts:
            return acc
        values = torch.cat([p.to("cpu", non_blocking=False) for p, _ in self._parts]).tolist()
        sizes = [n for _, group in self._parts for n in group]
        for (total, positional), n in zip(values, sizes, strict=True):
            acc = wire.fold(acc, combine((total, positional), n))
        return acc
