"""A rank's warm-up: everything the first request would otherwise pay, done before it is healthy.

`rank.serve` awaits `warm_rank(...)` after building the engine, pool and data-plane endpoint and
before it prints its readiness line (the controller reports the instance healthy only once every
rank is ready), so the first request of a fresh mesh finds:

1. the engine run once (a one-page prompt on the engine thread; a decode step on a decode rank):
   torch's lazy kernel and allocator set-up, cuBLAS handles and CUDA context on a GPU, where
   prompts of each of `GPU_WARM_LENGTHS` follow on each stream a prefill may run on (the caching
   allocator keeps blocks per stream; CUDA loads each kernel on its first use, and the GEMMs of
   another prompt length use other kernels);
2. the pack / unpack kernels and the checksum run once on one page (on a GPU this compiles the
   Triton kernels, `worker/kv/pack_triton.py`; on a CPU the pack's and unpack's compiled loop,
   `worker/kv/pack_numba.py`, the checksum of one message sent or received in place,
   `worker/kv/sum_numba.py`, and on a prefill rank the same-host page copy's,
   `worker/kv/copy_numba.py`; a GPU prefill rank runs the same-host copier itself once,
   `samehost_copy.warm`, so its Triton copy is compiled for ids placed as a transfer places them);
3. the staging buffers of a transfer of up to `chunk_bytes` per chunk allocated and touched
   (first-touch page faults cost ~10x a copy here; staging.py);
4. the transport warm: one loopback transfer of one page through this rank's own data-plane
   end (a prefill rank fetches from its own listener; a decode rank fetches from a temporary
   listener of its own), so the UCX worker, its listener, endpoint wire-up and the shared-memory
   transports have run once.

The pages it uses go back to the pool before the rank reports ready. `PDMESH_WARMUP=0` skips it
(for measuring what it saves: `make bench`, part ttft). Each step's time is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import numpy as np
import torch

from pdmesh.worker.engine.protocol import DecodeItem
from pdmesh.worker.kv import page_copy
from pdmesh.worker.kv.pack import check_page_ids
from pdmesh.worker.rank import layer_stream
from pdmesh.worker.transfer import digest, samehost_copy, wire

log = logging.getLogger(__name__)
_ROOM, _TOKEN = 1, b"pdmesh-warmup"
#: A GPU rank's warm-up prompt lengths (tokens, exactly). A fresh GPU mesh warmed with one
#: 2048-token prompt still took 69 ms for its first 512-token prefill against 19 steady (H100,
#: README); in a 36-page pool, where the warm-up took only prompts of 127 and 271 tokens, the
#: first 512-token prefill took 133 ms against 38 steady: each length meets its own kernels.
GPU_WARM_LENGTHS = (128, 512, 2048, 8192)


def enabled() -> bool:
    return os.environ.get("PDMESH_WARMUP", "1").strip().lower() not in {"0", "false", "no", "off"}


async def warm_rank(engine, pages, transfer, engine_thread) -> dict[str, float]:
    """Warm this rank (see the module docstring); the milliseconds each step took."""
    took: dict[str, float] = {}
    ids = pages.alloc(2)
    try:
        for name, step in (("engine", lambda: engine_thread.run(_engine_once, engine, pages, ids,
                                                                 not transfer.is_prefill)),
                           ("kernels", lambda: _kernels(engine_thread, pages.kv, ids,
                                                        _copies_same_host(transfer))),
                           ("staging", lambda: _touch_staging(transfer, pages)),
                           ("transport", lambda: _loopback(transfer, pages, ids))):
            started = time.perf_counter()
            await step()
            took[name] = round((time.perf_counter() - started) * 1e3, 1)
    finally:
        pages.free(ids)
    log.info("rank warmed up (ms): %s", took)
    return took


def _engine_once(engine, pages, ids: list[int], decode: bool) -> None:
    """The engine once: a one-page prompt, and on a GPU also prompts of `GPU_WARM_LENGTHS` on
    every stream a prefill runs on, so the caching allocator holds a long prompt's activations
    and CUDA has loaded the kernels of those shapes before the first request."""
    kv, page = pages.kv, engine.layout.page_size
    n = max(1, min(page, engine.max_seq_len - 2))
    first = engine.prefill(_prompt(engine, n), kv, ids, on_layer=lambda layer: None)
    if decode:
        engine.decode_step(kv, [DecodeItem(first, n, ids)])
    if kv.is_cuda:  # on a CPU a prompt of a few thousand tokens would take seconds to minutes
        streams = [None] if decode else [None, layer_stream.compute_stream(kv.device)]
        _long_prompt_once(engine, pages, decode, streams)
        torch.cuda.synchronize(kv.device)


def _long_prompt_once(engine, pages, decode: bool, streams: list) -> None:
    """A prompt of each of `GPU_WARM_LENGTHS` tokens (at most the engine's longest) on each of
    `streams` (None: the current one), and a decode step after each on a decode rank. The prompt
    is exactly that long (cuBLAS picks its GEMM kernels by shape: a 511-token prompt does not
    load a 512-token one's). Its pages come from the pool while it has them free, else from a
    scratch pool of the same layout that lives for that prompt only (a pool sized for a few
    requests must not limit what the warm-up covers; the caching allocator keeps the block for
    later activations). Only a head start: if one fails (no memory for a long prompt's scratch
    pool or activations), the rank logs why and starts anyway."""
    kv = pages.kv
    for n in _gpu_prompt_lengths(engine):
        need = engine.layout.pages_for_tokens(n + 1)  # the decode step writes position n
        own = need <= pages.pool.num_free
        # the pool itself (thread-safe): this runs on the engine thread; nothing waits for pages
        ids = pages.pool.alloc(need) if own else list(range(need))
        try:
            where = kv if own else torch.empty((kv.shape[0], kv.shape[1], need, *kv.shape[3:]),
                                               dtype=kv.dtype, device=kv.device)
            for stream in streams:  # a prefill runs on the default stream, or streamed on its own
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    first = engine.prefill(_prompt(engine, n), where, ids,
                                           on_layer=lambda layer: None)
            if decode:
                engine.decode_step(where, [DecodeItem(first, n, ids)])
        except Exception as err:  # noqa: BLE001 - a warm-up step, not a request
            log.warning("the %d-token warm-up prompt failed (%s: %s); a first request of that "
                        "length pays its set-up", n, type(err).__name__, err)
            return
        finally:
            if own:
                pages.pool.free(ids)


def _prompt(engine, n: int) -> list[int]:
    return [1 + i % max(1, engine.tokenizer.vocab_size - 1) for i in range(n)]


def _gpu_prompt_lengths(engine) -> list[int]:
    """GPU_WARM_LENGTHS, each at most the engine's longest prompt that leaves room for a decode
    step (distinct, shortest first)."""
    return sorted({max(1, min(tokens, engine.max_seq_len - 2)) for tokens in GPU_WARM_LENGTHS})


def _copies_same_host(transfer) -> bool:
    """Whether this rank may write a same-host peer's pool (a prefill rank, path `auto`)."""
    return transfer.is_prefill and transfer.sender.config.path == "auto"


async def _kernels(engine_thread, kv: torch.Tensor, ids: list[int], same_host: bool) -> None:
    await engine_thread.run(_kernels_once, kv, ids, same_host)
    if same_host and kv.is_cuda:  # the copier a transfer runs, on the event loop as it runs there
        await samehost_copy.warm(kv, ids)


def _kernels_once(kv: torch.Tensor, ids: list[int], same_host: bool) -> None:
    index = check_page_ids(kv, ids[:1], unique=True)
    staging = torch.empty((1, 2, 1) + tuple(kv.shape[3:]), dtype=kv.dtype, device=kv.device)
    buf = staging.view(-1).view(torch.uint8)
    digest.pack_parts(kv, index, 0, 1, buf)  # the pack as a transfer runs it (checksum fused)
    wire.checksum(buf)
    digest.unpack_parts(buf, kv, index, 0, 1)
    if not kv.is_cuda:  # a message sent or received in place, summed as it completes
        digest.message_parts(buf, np.empty((1, 2), dtype=np.uint64), 0)
    if same_host:
        page_copy.warm(kv, ids)
    if kv.is_cuda:
        torch.cuda.synchronize(kv.device)


async def _touch_staging(transfer, pages) -> None:
    """Allocate and touch the staging buffers a transfer of full-size chunks takes."""
    end = transfer.sender if transfer.is_prefill else transfer.receiver
    config = end.config
    layer = wire.ChunkPlan(pages.layout, 1, 1).layer_bytes  # one page, one layer
    per_chunk = max(layer, config.chunk_bytes)
    depth = (config.send_depth if transfer.is_prefill else config.recv_window) + 1
    staging = end._staging_for(pages.pool)  # the cache the transfers draw from
    taken = [staging.take(per_chunk) for _ in range(depth)]
    for buf in taken:
        buf.zero_()
    for buf in taken:
        staging.give(buf)


async def _loopback(transfer, pages, ids: list[int]) -> None:
    """One page through this rank's own data-plane end, and back into the pool."""
    from pdmesh.worker.transfer.receiver import KvReceiver
    from pdmesh.worker.transfer.sender import KvSender

    if transfer.is_prefill:
        sender, receiver = transfer.sender, KvReceiver("ucx", config=transfer.sender.config)
        own = receiver
    else:
        sender = KvSender("ucx", epoch=0, config=transfer.receiver.config)
        receiver, own = transfer.receiver, sender
        await sender.start()
    try:
        offer = sender.offer(_ROOM, pages.pool, ids[:1], 0, token=_TOKEN, timeout=10.0)
        await receiver.fetch(sender.address, _ROOM, epoch=sender.epoch, pool=pages.pool,
                             page_ids=ids[1:], token=_TOKEN, timeout=10.0)
        await offer
    finally:
        await own.close()
        await asyncio.sleep(0)
