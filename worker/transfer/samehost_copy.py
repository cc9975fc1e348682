"""How the same-host writer copies a transfer's chunks into the mapped pool: CPU or CUDA.

Both copiers take the chunks in order (`await copier.chunk(status, a, b, nbytes, mark)`) and end
with `await copier.settle()`, which returns the checksum once no copy runs any more: the writer
calls it whatever happened, before the trailer or the abort, so no page goes back to a pool
while a copy may still touch it.

- `CpuCopier`: a chunk of at most `INLINE_COPY_BYTES` is copied on the event loop; a larger
  one's layers split into slices of at least `SLICE_MIN_BYTES` over up to
  `threads` jobs of the writer's executor (the compiled copy releases the GIL; its stores are
  non-temporal there, worker/kv/copy_numba.py), awaited before
  the next chunk; a failed slice fails the transfer once every slice ended.
- `CudaCopier`: every chunk is one Triton launch on the rank's copy stream, queued behind the
  CUDA event of the chunk's last layer (`stream.wait_event`: no host wait, so layer streaming
  costs the event loop a launch per chunk). The page ids go to the device once per transfer,
  queued on the copy stream (no host wait);
  the checksum slots stay there until `settle`, which sums them on the device and waits for
  the stream (polled on the event loop briefly, then in the executor): one host wait per
  transfer.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import torch

from pdmesh.errors import DataLoss
from pdmesh.reasons import Reason
from pdmesh.worker.kv import page_copy
from pdmesh.worker.kv.pack import ids_on
from pdmesh.worker.kv.page_copy import CopyPlan, copy_pages

log = logging.getLogger(__name__)
# A CPU chunk is split over the writer's threads in slices of at least this many bytes (a thread
# hand-off costs ~0.1 ms; a 4 MiB slice copies in ~0.4 ms here).
SLICE_MIN_BYTES = 4 << 20
# A CPU chunk this small is copied on the event loop (~0.2 ms for 2 MiB here): the two thread
# hand-offs of a job cost ~0.25 ms, more than the copy.
INLINE_COPY_BYTES = 2 << 20
# How long the CUDA writer's settle polls its event on the event loop before it waits in a
# thread (the hand-off costs ~0.1 ms; most copies end sooner).
SETTLE_POLL_S = 0.0005


def make_copier(src_kv: torch.Tensor, dst_kv: torch.Tensor, copies: CopyPlan, executor,
                threads: int):
    if src_kv.is_cuda:
        return CudaCopier(src_kv, dst_kv, copies, executor)
    return CpuCopier(src_kv, dst_kv, copies, executor, threads)


class CpuCopier:
    def __init__(self, src_kv, dst_kv, copies: CopyPlan, executor, threads: int) -> None:
        self.src_kv, self.dst_kv, self.copies = src_kv, dst_kv, copies
        self.executor, self.threads = executor, threads
        self.acc = 0

    async def chunk(self, status, a: int, b: int, nbytes: int, mark=None) -> None:
        if nbytes <= INLINE_COPY_BYTES:  # copied here: cheaper than the hand-off to a thread
            self.acc = (self.acc + copy_job(self.src_kv, self.dst_kv, self.copies, a, b)
                        ) & page_copy.MASK64
            return
        loop = asyncio.get_running_loop()
        parts = min(self.threads, nbytes // SLICE_MIN_BYTES)
        jobs = [loop.run_in_executor(self.executor, copy_job, self.src_kv, self.dst_kv,
                                     self.copies, x, y, True) for x, y in slices(a, b, parts)]
        try:
            values = await status.guard(asyncio.gather(*jobs))
        except Exception:  # the transfer failed, or a copy did (DATA_LOSS), or a bug
            await asyncio.wait(jobs)  # every copy runs to its end before anything else
            raise
        self.acc = (self.acc + sum(values)) & page_copy.MASK64

    async def settle(self) -> int:
        return self.acc  # each chunk's jobs ended before the next began


class CudaCopier:
    def __init__(self, src_kv, dst_kv, copies: CopyPlan, executor) -> None:
        self.src_kv, self.dst_kv, self.executor = src_kv, dst_kv, executor
        self.stream = copy_stream(src_kv.device)
        with torch.cuda.stream(self.stream):  # queued on the copy stream: no host wait
            self.src_ids = ids_on(copies.src_ids, src_kv.device)
            self.dst_ids = ids_on(copies.dst_ids, src_kv.device)
        self.sums: list[torch.Tensor] = []

    async def chunk(self, status, a: int, b: int, nbytes: int, mark=None) -> None:
        from pdmesh.worker.kv import copy_triton

        try:
            with torch.cuda.stream(self.stream):
                if mark is not None:
                    self.stream.wait_event(mark)  # the layers' K/V writes come first
                sums = copy_triton.launch_copy(self.src_kv, self.dst_kv, self.src_ids,
                                               self.dst_ids, a, b)
        except Exception as err:  # noqa: BLE001 - reported as the transfer's failure
            raise _copy_failed(a, b, err) from None
        if sums is not None:
            self.sums.append(sums)

    async def settle(self) -> int:
        """The checksum once the stream passed every copy: summed on the device and read into
        host memory behind them, then waited for on the event loop for up to SETTLE_POLL_S (a
        64 MiB copy takes ~0.05 ms: no thread hand-off), else in the executor."""
        loop = asyncio.get_running_loop()
        try:
            with torch.cuda.stream(self.stream):
                total = torch.cat(self.sums).sum().to("cpu", non_blocking=True) if self.sums \
                    else None
                done = torch.cuda.Event()
                done.record(self.stream)
            until = loop.time() + SETTLE_POLL_S
            while not done.query():
                if loop.time() >= until:
                    await loop.run_in_executor(self.executor, done.synchronize)
                    break
                await asyncio.sleep(0)
        except Exception as err:  # noqa: BLE001 - a fault of a copy surfaces here
            raise _copy_failed(0, 0, err) from None
        return 0 if total is None else int(total) & page_copy.MASK64


@functools.cache
def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream this process's same-host copies run on (one per device)."""
    return torch.cuda.Stream(device)


def slices(a: int, b: int, parts: int) -> list[tuple[int, int]]:
    """Layers [a, b) as at most `parts` contiguous slices of near-equal length (the checksum
    adds up over slices: page_copy's rows are weighted by their layer)."""
    parts = max(1, min(parts, b - a))
    cuts = [a + (b - a) * i // parts for i in range(parts + 1)]
    return list(zip(cuts, cuts[1:]))


def copy_job(src_kv: torch.Tensor, dst_kv: torch.Tensor, copies: CopyPlan, a: int, b: int,
             streaming: bool = False) -> int:
    """One slice of layers (a worker thread's, with streaming stores; or a small chunk on the
    event loop); any fault becomes a typed failure of the transfer."""
    try:
        return copy_pages(src_kv, dst_kv, copies, a, b, streaming=streaming)
    except Exception as err:  # noqa: BLE001 - reported as the transfer's failure
        raise _copy_failed(a, b, err) from None


async def warm(kv: torch.Tensor, pages: list[int], executor=None) -> int:
    """A rank's warm-up: the copier a same-host transfer makes, run once from page `pages[0]` of
    `kv` into `pages[1]` (two pages the caller owns), every layer, settled. On a GPU this loads
    the Triton copy as a transfer launches it (the page ids put on the device as a transfer puts
    them: Triton compiles a kernel per alignment of its pointers, and a view into one ids tensor
    is not aligned as a fresh one is) and the settle's reduction and read-back. Returns the
    checksum."""
    plan = CopyPlan(torch.tensor(pages[:1], dtype=torch.int64),
                    torch.tensor(pages[1:2], dtype=torch.int64))
    copier = make_copier(kv, kv, plan, executor, threads=1)
    layers = kv.shape[0]
    await copier.chunk(None, 0, layers, layers * 2 * kv[0, 0, 0].numel() * kv.element_size())
    return await copier.settle()


def _copy_failed(a: int, b: int, err: BaseException) -> DataLoss:
    log.error("same-host copy of layers [%d, %d) failed: %r", a, b, err)
    return DataLoss(f"the same-host copy failed: {type(err).__name__}: {err}",
                    reason=Reason.KV_SAME_HOST_COPY_FAILED)
