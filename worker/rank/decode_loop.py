"""Continuous batching on a decode rank: sequences join when their KV has arrived, and every step
advances all running sequences by one token in one engine call.

Owns: the running set, page growth (a sequence gets a new page when its next token starts one),
finishing (EOS or token budget) and giving pages back. When the pool has no page for a growing
sequence, that sequence is preempted: its pages are freed and it ends with RESOURCE_EXHAUSTED;
no other sequence is touched. Engine calls run on the rank's single engine thread (engines are
not thread-safe), so the event loop keeps serving gRPC and UCX while a step computes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from pdmesh import metrics
from pdmesh.errors import Internal, PdmeshError, ResourceExhausted, Unavailable
from pdmesh.reasons import Reason
from pdmesh.worker.engine.protocol import DecodeItem, Engine, SamplingParams
from pdmesh.worker.rank.pages import EngineThread, PageBroker

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    """One request being decoded; `out` receives token ids, then None (done) or a PdmeshError."""

    room: int
    page_ids: list[int]
    position: int  # index of `last_token` in the sequence (= tokens whose K/V are in the pool)
    last_token: int
    remaining: int  # tokens still to generate
    sampling: SamplingParams
    stop_ids: frozenset[int]
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False
    #: Set by an abort that arrives while a step computes with this sequence's pages.
    aborted: PdmeshError | None = None


class DecodeLoop:
    """The decode rank's batch: `join` a sequence, read its tokens from `sequence.out`."""

    def gauge_samples(self):
        """Live gauges for /metrics: sequences in the continuous batch."""
        yield "pdmesh_decode_running", (), len(self.running)

    def __init__(self, engine: Engine, pool: PageBroker, engine_thread: EngineThread,
                 max_batch: int = 64) -> None:
        self.engine = engine
        self.pool = pool
        self.engine_thread = engine_thread
        self.max_batch = max_batch
        self.running: dict[int, Sequence] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stepping: set[int] = set()  # rooms whose pages the engine thread is writing now

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for seq in list(self.running.values()):
            self._finish(seq, Unavailable("the decode rank is stopping", reason=Reason.RANK_STOPPING))

    def join(self, seq: Sequence) -> None:
        """Add a sequence whose prompt KV (and first token) are in its pages."""
        self.running[seq.room] = seq
        self._wake.set()

    def abort(self, room: int, error: PdmeshError) -> bool:
        seq = self.running.get(room)
        if seq is None:
            return False
        if room in self._stepping:  # free the pages only once the engine has let go of them
            seq.aborted = error
        else:
            self._finish(seq, error)
        return True

    def _finish(self, seq: Sequence, result: PdmeshError | None) -> None:
        if seq.finished:
            return
        seq.finished = True
        self.running.pop(seq.room, None)
        self.pool.free(seq.page_ids)
        seq.page_ids = []
        seq.out.put_nowait(result)

    def _grow(self, seq: Sequence) -> bool:
        """Give `seq` the page its next token needs; preempt it when the pool is empty."""
        size = self.pool.layout.page_size
        if seq.position // size < len(seq.page_ids):
            return True
        try:
            seq.page_ids.extend(self.pool.alloc(1))
            return True
        except ResourceExhausted:
            self._finish(seq, ResourceExhausted(
                f"room {seq.room} was preempted: the decode KV pool has no free page for token "
                f"{seq.position + 1}; retry, or run decode with more pages", reason=Reason.KV_POOL_EXHAUSTED,
                metadata={"bootstrap_room": seq.room, "num_pages": self.pool.num_pages}))
            return False

    async def _run(self) -> None:
        while True:
            if not self.running:
                self._wake.clear()
                await self._wake.wait()
            batch = [s for s in list(self.running.values())[: self.max_batch] if self._grow(s)]
            if not batch:
                continue
            items = [DecodeItem(s.last_token, s.position, tuple(s.page_ids), s.sampling) for s in batch]
            metrics.DECODE_BATCH.observe(len(batch))
            self._stepping = {s.room for s in batch}
            try:
                tokens = await self.engine_thread.run(self.engine.decode_step, self.pool.kv, items)
            except Exception as exc:  # noqa: BLE001 - fail the batch typed, keep the loop alive
                log.exception("decode step failed")
                for seq in batch:
                    self._finish(seq, Internal(f"decode step failed: {type(exc).__name__}: {exc}",
                                               reason=Reason.DECODE_STEP_FAILED))
                continue
            finally:
                self._stepping = set()
            for seq, token in zip(batch, tokens):
                if seq.aborted is not None:
                    self._finish(seq, seq.aborted)
                    continue
                seq.last_token, seq.position, seq.remaining = token, seq.position + 1, seq.remaining - 1
                seq.out.put_nowait(token)
                if token in seq.stop_ids or seq.remaining <= 0:
                    self._finish(seq, None)
