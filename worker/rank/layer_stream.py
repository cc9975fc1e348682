"""Layer streaming on a prefill rank: offer the room, then compute it while its KV leaves.

With `layer_streaming` on (the default; `--no-layer-streaming` or `PDMESH_LAYER_STREAMING=0`
turn it off), a prefill rank offers a room's pages to its decode BEFORE computing them:

1. `RankTransfer.open_room` offers the pages with no first token yet, bounded by the request's
   deadline. A decode whose request is already waiting is answered OK at once.
2. The engine computes on the rank's engine thread; after each layer's K/V writes it calls the
   reporter (`Engine.prefill(..., on_layer=...)`), which hands `offer.layer_done(i, mark)` to the
   event loop with `loop.call_soon_threadsafe` (on a GPU, `mark` is a CUDA event recorded right
   behind the layer's writes on the rank's compute stream, and only the last layer of each of
   `GPU_STREAM_CHUNKS` chunks is reported, by default one chunk: the last layer; the sender
   waits for it before it reads the pages).
   The sender sends chunk i as soon as its last layer is final.
3. When compute ends, `offer.computed(first_token, hold_s)` releases the last chunk and the
   trailer (which carries the first token), and bounds how long an unclaimed room still waits
   for its decode (`transfer_wait_s`, as a room computed without streaming).
4. A prefill that fails mid-compute (or is cancelled) fails the offer with its typed error
   (anything untyped becomes INTERNAL PREFILL_COMPUTE_FAILED): a decode already receiving gets
   it through the transfer's abort. The caller frees the pages only after this returns or
   raises, and it does so only once no engine, pack thread or UCX request touches them.

With streaming, a decode that claimed the room early spends the rest of the compute in its
TRANSFERRING state: there `TransferConfig.transfer_timeout_s` (60 s by default) bounds the time
without a chunk arriving, not the whole transfer; the offer itself is bounded by the request's
deadline until its compute ends, then by `transfer_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import Sequence

import torch

from pdmesh.errors import Cancelled, Internal, PdmeshError
from pdmesh.reasons import Reason
from pdmesh.worker.transfer.layers import stream_chunk_ends


class LayerReporter:
    """Engine thread -> event loop: each finished layer of one prefill goes to its offer."""

    def __init__(self, offer, loop: asyncio.AbstractEventLoop, stream=None) -> None:
        self.offer, self.loop, self.stream = offer, loop, stream
        # on a GPU only the chunk ends (layers.py: a report covers the layers before it)
        self.reported = None if stream is None else stream_chunk_ends(offer.pool.layout.num_layers)

    def __call__(self, layer: int) -> None:
        mark = None
        if self.stream is not None:
            if layer not in self.reported:
                return
            mark = torch.cuda.Event()
            mark.record(self.stream)
        self.loop.call_soon_threadsafe(self.offer.layer_done, layer, mark)

    def prefill(self, engine, token_ids: Sequence[int], kv: torch.Tensor, page_ids: list[int],
                sampling) -> int:
        """Engine thread: run the prefill (on the compute stream on a GPU), reporting layers."""
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with ctx:
            return engine.prefill(token_ids, kv, page_ids, sampling, self)


@functools.cache
def compute_stream(device: torch.device):
    """The rank's prefill stream on a GPU (None on the CPU): packing on another stream can then
    overlap the compute of later layers instead of queueing behind them."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


async def prefill_streamed(state, room: int, ids: Sequence[int], pages: list[int], sampling,
                           token: bytes, deadline: float) -> tuple[int, float, float]:
    """Offer `pages` for `room`, compute them on the engine thread while they stream, wait until
    they are sent. Returns (first token, compute end, transfer end) as perf_counter times."""
    st = state
    offer = st.transfer.open_room(room=room, page_ids=pages, token=token, deadline=deadline)
    settled = st.transfer.settle(room, offer)
    reporter = LayerReporter(offer, asyncio.get_running_loop(), compute_stream(st.pages.kv.device))
    try:
        first = await st.engine_thread.run(reporter.prefill, st.engine, ids, st.pages.kv, pages,
                                           sampling)
    except BaseException as err:
        st.transfer.sender.abort(room, _offer_error(room, err))
        await wait_quietly(settled)  # nothing uses the pages any more once this returns
        raise
    computed = time.perf_counter()
    offer.computed(first, max(0.001, min(deadline - time.monotonic(),
                                         st.config.instance.transfer_wait_s)))
    await settled
    return first, computed, time.perf_counter()


def _offer_error(room: int, err: BaseException) -> PdmeshError:
    if isinstance(err, PdmeshError):
        return err
    if isinstance(err, asyncio.CancelledError):
        return Cancelled(f"the prefill request for room {room} was cancelled",
                         reason=Reason.KV_TRANSFER_CANCELLED, metadata={"room": room})
    return Internal(f"the prefill of room {room} failed while computing: {err!r}",
                    reason=Reason.PREFILL_COMPUTE_FAILED, metadata={"room": room})


async def wait_quietly(task: asyncio.Future) -> None:
    """Wait for `task` to end whatever it raises, even when the caller is cancelled meanwhile
    (the cancellation is raised once it ended: the pages are free to go then)."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
    if not task.cancelled():
        task.exception()
    if cancelled:
        raise asyncio.CancelledError
