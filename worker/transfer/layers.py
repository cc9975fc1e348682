"""Which layers of an offered room's KV are final: what lets a transfer stream layer by layer.

A prefill rank may offer a room BEFORE computing it (its pages allocated, the first token not
known yet): the decode's request is then answered at once and chunk i (layers [a, b)) leaves as
soon as layer b - 1 is final, while later layers still compute. The engine reports each layer
(`Engine.prefill(..., on_layer=...)`, on the engine thread; `pdmesh.worker.rank.layer_stream` hands it
to the event loop with `loop.call_soon_threadsafe`), then the first token once the prefill ends.

    ready = LayerReadiness(num_layers)       # an offer made before compute
    ready.layer_done(i, event)               # event loop thread, in layer order
    ready.computed(first_token)              # every layer final, the first token known
    mark = await ready.wait(b)               # layers [0, b) final; b == num_layers: token known

`wait(b)` resolves with the marker of layer b - 1: None on the CPU, on a GPU a CUDA event
recorded behind that layer's K/V writes on the compute stream. A reporter may skip layers (on a
GPU it reports only chunk ends: `stream_chunk_ends`): a report of layer i covers every layer
before it, and its event stands for them all. A consumer that reads the pages
from another stream waits on it first (`stream.wait_event(mark)`, no host sync) or, where the
reader cannot wait on a stream (UCX in-place sends, a peer's copy), `await ready.wait(b,
on_host=True)` also waits for the event's completion, in a helper thread so the event loop keeps
running. `wait(num_layers)` resolves only once the first token is known, so a sender that has
waited for every chunk's layers may build the trailer.

An offer made after compute is complete from the start (`LayerReadiness.complete(...)`).
`fail(error)` (the offer failed) fails every pending wait. Event loop thread only.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any


#: On a GPU a streamed room leaves in this many chunks of layers (`PDMESH_GPU_STREAM_CHUNKS`
#: overrides it). 1: the room is offered before compute, so the decode's request and the OK
#: overlap the compute, and its KV leaves in one launch once computed. Each further chunk costs
#: the launch-bound engine thread an event and the event loop a wake-up and a launch while the
#: prefill computes, and on the H100 (bench/_gpu_stream_chunks.py: one mesh, prefills with 1, 2
#: and 4 chunks and one without streaming, requests interleaved, two runs) 1 chunk had the
#: lowest PD TTFT at 512 and 2048 tokens (24-27 ms against 28-40 for 2 or 4 chunks and 25-36
#: without streaming), the same tail after compute (1.0-1.2 ms) and the same TTFT at 8192. A
#: slower wire (KV across hosts) may want more: the copy of a chunk there takes milliseconds.
GPU_STREAM_CHUNKS = 1


def gpu_stream_chunks() -> int:
    """GPU_STREAM_CHUNKS, or `PDMESH_GPU_STREAM_CHUNKS` where set (1: the whole room leaves in
    one launch once computed; its request and status still overlap the compute)."""
    raw = os.environ.get("PDMESH_GPU_STREAM_CHUNKS", "").strip()
    if not raw:
        return GPU_STREAM_CHUNKS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"PDMESH_GPU_STREAM_CHUNKS must be a whole number >= 1, not {raw!r}")
    return int(raw)


def stream_chunk_layers(num_layers: int) -> int:
    """Layers per chunk of a room streamed on a GPU."""
    return max(1, -(-num_layers // gpu_stream_chunks()))


def stream_chunk_ends(num_layers: int) -> frozenset[int]:
    """The layers a GPU reporter reports: the last layer of each streamed chunk."""
    step = stream_chunk_layers(num_layers)
    return frozenset(min(end, num_layers) - 1 for end in range(step, num_layers + step, step))


class LayerReadiness:
    """The layers of one room whose KV is final, and its first token once computed."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.count = 0  # layers [0, count) are final
        self.first_token: int | None = None
        self._marks: list[Any] = [None] * num_layers
        self._waiters: list[tuple[int, asyncio.Future]] = []

    @classmethod
    def complete(cls, num_layers: int, first_token: int) -> "LayerReadiness":
        ready = cls(num_layers)
        ready.count, ready.first_token = num_layers, first_token
        return ready

    @property
    def done(self) -> bool:
        return self.first_token is not None

    def layer_done(self, layer: int, mark: Any = None) -> None:
        """Layer `layer` (and every one before it) is final; `mark`: its CUDA event, or None."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} outside 0..{self.num_layers - 1}")
        if layer >= self.count:
            # the mark was recorded behind every layer up to this one: a reporter may skip layers
            self._marks[self.count:layer + 1] = [mark] * (layer + 1 - self.count)
            self.count = layer + 1
            self._wake()

    def computed(self, first_token: int) -> None:
        """The prefill ended: every layer is final and the first token is `first_token`."""
        self.count, self.first_token = self.num_layers, int(first_token)
        self._wake()

    def _ready(self, n: int) -> bool:
        return self.count >= n and (n < self.num_layers or self.first_token is not None)

    def wait(self, n: int, *, on_host: bool = False) -> asyncio.Future:
        """A future that resolves with layer n - 1's marker once layers [0, n) are final (and,
        for n == num_layers, the first token known); `on_host`: also once the GPU wrote them."""
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"{n} layers outside 0..{self.num_layers}")
        loop = asyncio.get_running_loop()
        if on_host:
            return asyncio.ensure_future(self._wait_on_host(n))
        future = loop.create_future()
        if self._ready(n):
            future.set_result(self._marks[n - 1] if n else None)
        else:
            self._waiters.append((n, future))
        return future

    async def _wait_on_host(self, n: int) -> Any:
        mark = await self.wait(n)
        if mark is not None and not mark.query():
            await asyncio.get_running_loop().run_in_executor(None, mark.synchronize)
        return mark

    def fail(self, error: BaseException) -> None:
        """The offer failed: every pending wait raises `error`."""
        waiters, self._waiters = self._waiters, []
        for _, future in waiters:
            if not future.done():
                future.set_exception(error)
                future.exception()  # the transfer's owner reports it, not the loop's GC

    def _wake(self) -> None:
        keep = []
        for n, future in self._waiters:
            if future.done():
                continue
            if self._ready(n):
                future.set_result(self._marks[n - 1] if n else None)
            else:
                keep.append((n, future))
        self._waiters = keep
