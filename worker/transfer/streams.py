"""The data loops of one transfer: `Outgoing` (sender) and `Incoming` (receiver).

Both follow the wire plan (runs.py) message by message. The sender posts each direct message
straight from its pool and each packed one once a worker thread has packed it; worker threads
also compute every message's checksum parts (digest.py), running `send_depth` chunks ahead (one
job for all chunks when nothing is packed and every layer is computed), and at most
`send_window_bytes` are on the wire at once; no direct message waits for a checksum (in a small
chunk of direct messages in a CPU pool each message is summed on the event loop as soon as it
has been sent: `INLINE_SUM_MAX_BYTES`, `MessageSums`). The receiver keeps the messages of
`recv_window` chunks posted (direct ones straight into its pool), and once a chunk has landed a
worker thread checksums it and unpacks its packed message while the next chunks arrive (in a
small chunk of direct messages in a CPU pool each message is summed on the event loop as soon
as it has landed); the jobs' results are collected in plan order.

On a GPU no step waits for the whole device: a packed buffer is handed to UCX after an event
recorded behind its pack kernel has completed, in the worker thread, so the event loop keeps
sending chunk i while chunk i+1 packs and chunk i-1 unpacks; checksum parts stay on the device
until the trailer (one read for the whole transfer).

The owners (sender.py, receiver.py) keep the contract: statuses, aborts, wind-down.
"""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np
import torch

from pdmesh.errors import PdmeshError
from pdmesh.worker.transfer import digest, runs, wire
from pdmesh.worker.transfer.config import TransferConfig
from pdmesh.worker.transfer.link import Link
from pdmesh.worker.transfer.runs import PoolSide
from pdmesh.worker.transfer.staging import StagingCache
from pdmesh.worker.transfer.state import TransferStatus

EMPTY = torch.empty(0, dtype=torch.uint8)
# A chunk of direct messages only, in a CPU pool and of at most this many bytes, is checksummed on
# the event loop with no worker thread, one message at a time as each completes (`MessageSums`):
# on the sender once it has been sent (the kernel's or UCX's copy has just read its bytes), on
# the receiver once it has landed (UCX has just written them), as close to that copy as the loop
# gets. A compiled loop sums 1 MiB in ~12-17 us where it is still in the cache; over tcp on 2
# busy cores most of it has left L2 by then (~5.5 ms a side per 64 MiB), still faster than per
# chunk (tcp 2.16 -> 2.37 GB/s at 64 MiB; README, transfer benchmark, fifth pass) or in a worker
# thread (fourth pass; again per message: 2.18). Larger chunks (a longer stall of the loop) and
# chunks with packed pages keep the worker thread.
INLINE_SUM_MAX_BYTES = 16 << 20


def _wait_device(kv: torch.Tensor) -> None:
    """Worker thread, GPU pools: return once the work queued so far on this stream is done."""
    if kv.is_cuda:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(kv.device))
        done.synchronize()


def _chunk_parts(direct: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    """Checksum parts of a chunk's messages in plan order, [k, 2]: direct ones, then packed."""
    parts = [p.view(-1, 2) for p in (direct, packed) if p is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _prepare_chunk(pack, side: PoolSide, msgs: tuple, a: int, b: int, buf: torch.Tensor
                   ) -> torch.Tensor:
    """Worker thread: checksum parts of chunk `msgs` in plan order: the direct blocks, read in
    place in the pool, then the packed message (`_pack_chunk`, called for every chunk)."""
    direct = side.direct_parts(a, b)
    packed = pack(side.kv, side.packed_ids, a, b, buf)  # sender._pack_chunk
    return _chunk_parts(direct, packed if msgs and not msgs[-1].direct else None)


def _sum_inline(side: PoolSide, msgs: tuple) -> bool:
    """Whether a chunk's checksum is taken on the event loop (`INLINE_SUM_MAX_BYTES`): direct
    messages only, in a CPU pool, a small chunk."""
    return (not side.kv.is_cuda and bool(msgs) and msgs[-1].direct
            and sum(m.nbytes for m in msgs) <= INLINE_SUM_MAX_BYTES)


class MessageSums:
    """Checksum parts of one chunk's direct messages (`INLINE_SUM_MAX_BYTES`), each taken on the
    event loop when its UCX request completes (`watch`), right after the copy that moved its
    bytes; `parts()` takes any not taken yet (a request whose callback has not run) and returns
    them [k, 2] in plan order. A failed request is not summed: its transfer fails."""

    def __init__(self, side: PoolSide, msgs: tuple, status: TransferStatus) -> None:
        self.blocks, self.status = [side.block(m) for m in msgs], status
        self.out = np.empty((len(msgs), 2), dtype=np.uint64)
        self.taken = [False] * len(msgs)

    def watch(self, i: int, request: asyncio.Future) -> None:
        request.add_done_callback(lambda done: self._completed(i, done))

    def _completed(self, i: int, request: asyncio.Future) -> None:
        if request.cancelled() or request.exception() is not None or self.status.terminal:
            return
        try:
            self._take(i)
        except Exception:  # noqa: BLE001 - `parts()` takes it again, in the transfer's own path
            pass

    def _take(self, i: int) -> None:
        if not self.taken[i]:
            digest.message_parts(self.blocks[i], self.out, i)
            self.taken[i] = True

    def parts(self) -> torch.Tensor:
        for i in range(len(self.blocks)):
            self._take(i)
        return torch.from_numpy(self.out.view(np.int64))


def _sent_sums(side: PoolSide, msgs: tuple, status: TransferStatus) -> MessageSums:
    """Sender: the `MessageSums` of a chunk of direct messages about to be posted."""
    return MessageSums(side, msgs, status)


def _prepare_chunks(pack, side: PoolSide, items: list) -> list[torch.Tensor]:
    """Worker thread: `_prepare_chunk` of several chunks of direct messages, in order."""
    return [_prepare_chunk(pack, side, msgs, a, b, EMPTY) for msgs, a, b in items]


def _fan_out(job: asyncio.Future, n: int) -> list[asyncio.Future]:
    """One future per entry of `job`'s list result (each fails or is cancelled with it)."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(n)]

    def done(_) -> None:
        for i, future in enumerate(futures):
            if job.cancelled():
                future.cancel()
            elif job.exception() is not None:
                future.set_exception(job.exception())
            else:
                future.set_result(job.result()[i])
            future.add_done_callback(lambda f: f.cancelled() or f.exception())

    job.add_done_callback(done)
    return futures


class Outgoing:
    """The sending half of one transfer: chunk jobs (checksums, packing) run ahead in worker
    threads, messages go out in plan order with at most `send_window_bytes` in flight."""

    def __init__(self, link: Link, tid: int, plan: runs.WirePlan, side: PoolSide,
                 staging: StagingCache, status: TransferStatus, config: TransferConfig,
                 pack) -> None:
        self.link, self.tid, self.plan, self.side, self.pack = link, tid, plan, side, pack
        self.staging, self.status, self.config = staging, status, config
        self.jobs: dict[int, tuple[asyncio.Future, torch.Tensor | None]] = {}
        self.inflight: deque = deque()  # (future, staging buffer or None, bytes)
        self._sums: dict[int, torch.Tensor] = {}  # checksum parts per chunk, once known
        self._hot: dict[int, MessageSums] = {}  # or taken message by message (`_inline`)
        # chunks summed on the event loop message by message as each is sent (no job):
        # decided once per transfer
        self._inline = frozenset(k for k, msgs in enumerate(plan.chunks) if _sum_inline(side, msgs))
        self.sent = self.total = self._bytes_in_flight = 0

    def prepare_ahead(self, c: int, executor, until: int | None = None) -> None:
        """Start the jobs of chunks c, c+1, ... (`send_depth` of them, none from `until` on:
        layer streaming prepares no chunk whose layers are not computed yet). A plan with
        nothing to pack whose layers are all computed gets one job for every remaining chunk:
        each hand-off to a worker thread cost a wake-up and a GIL round trip, ~1 ms on a
        loaded 2-core host (README)."""
        loop = asyncio.get_running_loop()
        if until is None and not self.plan.packed.size:
            todo = [k for k in range(c, len(self.plan.chunks))
                    if k not in self.jobs and k not in self._inline]
            if todo:
                items = [(self.plan.chunks[k], *self.plan.ranges[k]) for k in todo]
                job = loop.run_in_executor(executor, _prepare_chunks, self.pack, self.side, items)
                for k, future in zip(todo, _fan_out(job, len(todo))):
                    self.jobs[k] = (future, None)
            return
        stop = min(c + self.config.send_depth, len(self.plan.chunks))
        for k in range(c, stop if until is None else min(stop, until)):
            if k in self.jobs or k < c or k in self._inline:
                continue
            msgs, (a, b) = self.plan.chunks[k], self.plan.ranges[k]
            packed = msgs[-1].nbytes if msgs and not msgs[-1].direct else 0
            buf = self.staging.take(packed) if packed else EMPTY
            self.jobs[k] = (loop.run_in_executor(executor, _prepare_chunk, self.pack, self.side,
                                                 msgs, a, b,
                                                 buf), buf if packed else None)

    async def send_chunk(self, c: int) -> bool:
        """Send chunk `c`'s messages; False if the transfer failed meanwhile. A chunk of direct
        messages only does not wait for its checksum (a job that `checksum()` collects, or the
        sums of its messages, each taken once it has been sent): a slow worker thread never holds
        the wire back."""
        msgs = self.plan.chunks[c]
        sums = None
        if c in self._inline:  # the pool's pages do not change while they are sent
            sums = self._hot[c] = _sent_sums(self.side, msgs, self.status)
        for i, m in enumerate(msgs):
            if m.direct:
                request = await self._post(m, self.side.block(m), None)
                if request is None:
                    return False
                if sums is not None:
                    sums.watch(i, request)
        if not msgs or msgs[-1].direct:
            return True
        job, buf = self.jobs[c]
        await self._collect(c)  # the packed message (empty for a request of no pages)
        return await self._post(msgs[-1], EMPTY if buf is None else buf, buf) is not None

    async def _collect(self, c: int) -> None:
        job, _ = self.jobs[c]
        self._sums[c] = job.result() if job.done() else await self.status.guard(job)
        del self.jobs[c]

    async def checksum(self) -> int:
        """The transfer checksum, once every chunk's job has ended (plan order)."""
        for c in sorted(self.jobs):
            await self._collect(c)
        total = digest.Digest()
        for c, msgs in enumerate(self.plan.chunks):
            sums = self._sums[c] if c in self._sums else self._hot.pop(c).parts()
            total.add_rows(sums, [m.nbytes for m in msgs])
        return total.value()

    async def _post(self, m: runs.Message, data: torch.Tensor, staged) -> asyncio.Future | None:
        """Post message `m` once the send window has room: its UCX request, or None if the
        transfer failed meanwhile."""
        while self.inflight and self._bytes_in_flight + m.nbytes > self.config.send_window_bytes:
            if not await self._retire_one():
                return None
        if self.status.terminal:
            if staged is not None:
                self.staging.give(staged)
            return None
        future = self.link.send_data(data, wire.chunk_tag(self.tid, m.index))
        self.inflight.append((future, staged, m.nbytes))
        self.sent, self.total = self.sent + 1, self.total + m.nbytes
        self._bytes_in_flight += m.nbytes
        return future

    async def _retire_one(self) -> bool:
        future, buf, nbytes = self.inflight[0]
        try:
            if future.done():
                future.result()
            else:
                await self.status.guard(future)
        except PdmeshError:
            if not future.done():
                return False  # the transfer failed first; wind-down drains it
            raise
        self.inflight.popleft()
        self._bytes_in_flight -= nbytes
        if buf is not None:
            self.staging.give(buf)
        return True

    async def settle(self) -> None:
        while self.inflight and not self.status.terminal:
            if not await self._retire_one():
                return


def _finish_chunk(side: PoolSide, msgs: tuple, bufs: list, a: int, b: int,
                  sums: MessageSums | None = None) -> torch.Tensor:
    """Worker thread: checksum parts of a landed chunk in plan order (direct blocks where they
    landed in the pool), then unpack its packed message. Event loop, a chunk summed message by
    message (`sums`): its parts."""
    if sums is not None:
        return sums.parts()
    direct, packed = side.direct_parts(a, b), None
    if msgs and not msgs[-1].direct:
        packed = digest.unpack_parts(bufs[-1], side.kv, side.packed_ids, a, b)
        _wait_device(side.kv)  # its staging buffer goes back to the cache (and to UCX) next
    return _chunk_parts(direct, packed)


class Incoming:
    """The receiving half of one transfer. `fetch` (receiver.py's record) collects every UCX
    request and job started (`pending`), every staging buffer lent (`lent`) and the number of
    messages posted (`posted`), for the wind-down after a failure."""

    def __init__(self, fetch, plan: runs.WirePlan, side: PoolSide, staging: StagingCache,
                 config: TransferConfig) -> None:
        self.fetch, self.plan, self.side = fetch, plan, side
        self.staging, self.config = staging, config
        self.digest = digest.Digest()
        self.total = 0
        self._slots: dict[int, list] = {}
        self._hot: dict[int, MessageSums] = {}  # chunks summed message by message

    def _post_chunk(self, c: int) -> None:
        fetch, slots, msgs = self.fetch, [], self.plan.chunks[c]
        sums = None
        if _sum_inline(self.side, msgs):
            sums = self._hot[c] = MessageSums(self.side, msgs, fetch.status)
        for i, m in enumerate(msgs):
            if m.direct:
                buf = self.side.block(m)
            else:
                buf = self.staging.take(m.nbytes)
                fetch.lent.append(buf)
            future = fetch.link.recv_data(buf, wire.chunk_tag(fetch.transfer_id, m.index))
            fetch.pending.append(future)
            fetch.posted += 1
            slots.append((future, buf))
            if sums is not None:
                sums.watch(i, future)
        self._slots[c] = slots

    async def run(self, executor) -> None:
        """Receive every chunk; a landed chunk's job (checksum, unpack) runs in a worker thread
        while the next chunks land (`_finish`), and is collected in plan order once done (at most
        `recv_window` of them wait): the receives never wait for a slow worker thread."""
        status, chunks = self.fetch.status, self.plan.chunks
        window = min(self.config.recv_window, len(chunks))
        for c in range(window):
            self._post_chunk(c)
        jobs: deque = deque()  # (chunk, job, its staging buffer or None), plan order
        for c in range(len(chunks)):
            slots = self._slots.pop(c)
            waiting = [future for future, _ in slots if not future.done()]
            # one wait per chunk, not per message (a failed one fails it at once; the others
            # run on, tracked in fetch.pending for the wind-down)
            if waiting:
                await status.guard(waiting[0] if len(waiting) == 1 else asyncio.gather(*waiting))
            # progress renews TRANSFERRING's bound: a streamed prefill may still compute layers
            status.rebound(self.config.transfer_timeout_s)
            if c + window < len(chunks):
                self._post_chunk(c + window)  # the next receives land while this one unpacks
            bufs = [buf for _, buf in slots]
            packed = bool(chunks[c]) and not chunks[c][-1].direct
            job = self._finish(executor, c, bufs)
            jobs.append((c, job, bufs[-1] if packed else None))
            while jobs and (jobs[0][1].done() or len(jobs) > self.config.recv_window):
                await self._collect(*jobs.popleft())
        while jobs:
            await self._collect(*jobs.popleft())

    def _finish(self, executor, c: int, bufs: list) -> asyncio.Future:
        """The job of landed chunk `c` (`_finish_chunk`): done at once on the event loop where
        `_sum_inline`, else started in a worker thread and tracked for the wind-down."""
        loop, (a, b), msgs = asyncio.get_running_loop(), self.plan.ranges[c], self.plan.chunks[c]
        if c in self._hot:
            job = loop.create_future()
            job.set_result(_finish_chunk(self.side, msgs, bufs, a, b, self._hot.pop(c)))
            return job
        job = loop.run_in_executor(executor, _finish_chunk, self.side, msgs, bufs, a, b)
        self.fetch.pending.append(job)
        return job

    async def _collect(self, c: int, job: asyncio.Future, staged: torch.Tensor | None) -> None:
        sizes = [m.nbytes for m in self.plan.chunks[c]]
        self.digest.add_rows(job.result() if job.done() else await self.fetch.status.guard(job),
                             sizes)
        self.total += sum(sizes)
        if staged is not None:
            self.fetch.lent.remove(staged)
            self.staging.give(staged)
