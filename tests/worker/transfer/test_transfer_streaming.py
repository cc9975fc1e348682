"""Layer streaming in the transfer contract, on both transports (in-process and UCX).

The prefill offers a room before computing it (`first_token=None`) and reports its layers one by
one: every chunk leaves only once its layers are final (a recording fake of the pack checks it),
the bytes arrive exact, the trailer waits for the first token, and a prefill that fails
mid-compute fails the decode typed with both pools full afterwards. The fixtures (the mesh of
one sender and one receiver, the leak checks after every test) are the contract suite's.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from pdmesh.errors import Internal, PdmeshError
from pdmesh.worker.transfer import TransferState, samehost, samehost_copy
from pdmesh.worker.transfer import sender as sender_module
from pdmesh.worker.transfer import streams
from pdmesh.worker.transfer.layers import LayerReadiness, stream_chunk_ends, stream_chunk_layers
from test_transfer_contract import LAYOUT, _expect, ends, loop, mesh, run  # noqa: F401 - fixtures


def _at(i: int):
    return lambda args: (args[i], args[i + 1])


def _layers_of_messages(args) -> tuple[int, int]:
    layers = [m.layer for m in args[1]]
    return min(layers), max(layers) + 1


class RecordPack:
    """Records every chunk the sender packs (or copies, same host) with the layers final at
    that moment."""

    def __init__(self, monkeypatch, offer_of) -> None:
        self.packed: list[tuple[int, int, int]] = []  # (a, b, layers ready when packed)
        self.lock = threading.Lock()
        # (module, function, where its layers [a, b) are among its arguments: pack(kv, ids, a, b,
        # buf), copy(src_kv, dst_kv, copies, a, b), the sums of a small chunk sent in place,
        # made as its messages are posted: _sent_sums(side, msgs, status))
        for module, name, where in ((sender_module, "_pack_chunk", _at(2)),
                                    (samehost_copy, "copy_job", _at(3)),
                                    (streams, "_sent_sums", _layers_of_messages)):
            monkeypatch.setattr(module, name,
                                self._recording(getattr(module, name), where, offer_of))

    def _recording(self, real, where, offer_of):
        def recording(*args):
            with self.lock:
                self.packed.append((*where(args), offer_of().layers_ready))
            return real(*args)

        return recording

    def chunks(self) -> int:
        with self.lock:
            return len(self.packed)

    async def until(self, n: int) -> None:
        """Wait (bounded by the test's timeout) until `n` chunks were packed."""
        while self.chunks() < n:
            await asyncio.sleep(0.005)


def compute_layer(mesh, pages, layer: int, final: torch.Tensor) -> None:
    """What the engine does for one layer: write its final K/V into the offered pages."""
    mesh.src.kv[layer, :, pages] = final[layer]


def test_offer_before_compute_streams_layer_by_layer(mesh, run, monkeypatch):
    offer = None
    record = RecordPack(monkeypatch, lambda: offer)

    async def go():
        nonlocal offer
        room = mesh.room()
        src, dst = mesh.src.alloc(5), mesh.dst.alloc(5)
        final = torch.randn((LAYOUT.num_layers, 2, 5) + mesh.src.kv.shape[3:]).to(LAYOUT.dtype)
        mesh.src.kv[:, :, src] = 0  # not computed yet
        offer = mesh.sender.offer(room, mesh.src, src, None, token=b"secret", timeout=10)
        fetch = asyncio.ensure_future(mesh.fetch(room, dst, layers_per_chunk=2))  # 3 chunks
        while mesh.receiver.state(room) != TransferState.TRANSFERRING:
            await asyncio.sleep(0.005)
        for layer in range(LAYOUT.num_layers):
            assert record.chunks() == layer // 2  # chunk i waits for layers [2i, 2i + 2)
            compute_layer(mesh, src, layer, final)
            offer.layer_done(layer)
            if layer % 2 == 1 and layer + 1 < LAYOUT.num_layers:
                await record.until(layer // 2 + 1)  # it leaves while later layers "compute"
        await asyncio.sleep(0.05)
        assert not fetch.done() and record.chunks() == 2  # the last chunk and trailer: token
        offer.computed(4321)
        assert await fetch == 4321
        await offer
        assert all(ready >= b for _, b, ready in record.packed), record.packed
        assert [(a, b) for a, b, _ in record.packed] == [(0, 2), (2, 4), (4, 6)]
        assert torch.equal(mesh.dst.kv[:, :, dst].view(torch.uint8), final.view(torch.uint8))
        mesh.src.free(src)
        mesh.dst.free(dst)

    run(go())


def test_decode_after_compute_and_one_chunk_per_transfer(mesh, run):
    """An offer made before compute that ends before any decode asks: one whole chunk."""
    async def go():
        room = mesh.room()
        src, dst = mesh.src.alloc(3), mesh.dst.alloc(3)
        offer = mesh.sender.offer(room, mesh.src, src, None, token=b"secret", timeout=10)
        for layer in range(LAYOUT.num_layers):
            offer.layer_done(layer)
        offer.computed(77, hold_s=5.0)
        assert await mesh.fetch(room, dst) == 77
        await offer
        assert mesh.same(src, dst)
        mesh.src.free(src)
        mesh.dst.free(dst)

    run(go())


@pytest.mark.parametrize("claimed", [True, False])
def test_prefill_failing_mid_compute_fails_the_decode_typed(mesh, run, monkeypatch, claimed):
    offer = None
    record = RecordPack(monkeypatch, lambda: offer)

    async def go():
        nonlocal offer
        room = mesh.room()
        src, dst = mesh.src.alloc(4), mesh.dst.alloc(4)
        offer = mesh.sender.offer(room, mesh.src, src, None, token=b"secret", timeout=10)
        fetch = None
        if claimed:
            fetch = asyncio.ensure_future(mesh.fetch(room, dst, layers_per_chunk=1))
        for layer in range(3):
            offer.layer_done(layer)
        if claimed:
            await record.until(3)  # three chunks are out, the fourth waits for its layer
        error = Internal("the engine blew up", reason="PREFILL_COMPUTE_FAILED")
        assert mesh.sender.abort(room, error)
        await _expect(offer, Internal, "PREFILL_COMPUTE_FAILED")
        if claimed:
            err = await _expect(fetch, Internal, "PREFILL_COMPUTE_FAILED")
            assert "blew up" in err.message
        else:  # the decode that comes later finds no room (its prefill failed)
            await _expect(mesh.fetch(room, dst), PdmeshError, "KV_ROOM_NOT_FOUND")
        assert record.chunks() == (3 if claimed else 0)
        mesh.src.free(src)  # safe: `await offer` returned once nothing used them
        mesh.dst.free(dst)

    run(go())


def test_a_compute_longer_than_the_transfer_bound_streams_through(loop):
    """TRANSFERRING is bounded per chunk on the receiver, and an offer made before compute by the
    request's deadline until computed: a prefill whose layers keep coming is never cut off by
    `transfer_timeout_s`, however long its whole compute takes."""
    from pdmesh.worker.kv.pool import KvPool
    from pdmesh.worker.transfer import KvReceiver, KvSender, TransferConfig, make_transport
    config = TransferConfig(transfer_timeout_s=1.0, room_wait_s=2.0, chunk_bytes=1 << 20)
    sender = KvSender(make_transport("inproc"), epoch=1, config=config)
    receiver = KvReceiver(make_transport("inproc"), config=config)
    src, dst = KvPool(LAYOUT, 8), KvPool(LAYOUT, 8)

    async def go():
        address = await sender.start()
        pages = src.alloc(2)
        offer = sender.offer(5, src, pages, None, token=b"t", timeout=30)
        fetch = asyncio.ensure_future(receiver.fetch(address, 5, epoch=1, pool=dst, page_ids=pages,
                                                     token=b"t", timeout=30, layers_per_chunk=1))
        for layer in range(LAYOUT.num_layers):  # 6 x 0.25 s: longer than the 1 s bound
            await asyncio.sleep(0.25)
            offer.layer_done(layer)
        offer.computed(3)
        assert await fetch == 3
        await offer
        src.free(pages)
        await sender.close()
        await receiver.close()

    loop.run_until_complete(asyncio.wait_for(go(), 30))
    assert src.is_full() and dst.is_full()


def test_layer_readiness_waits_in_order():
    async def go():
        ready = LayerReadiness(3)
        first, last, none = ready.wait(1), ready.wait(3), ready.wait(0)
        assert none.done() and not first.done()
        ready.layer_done(0, "e0")
        await asyncio.sleep(0)
        assert first.result() == "e0" and not last.done()
        ready.layer_done(2, "e2")  # the last layer is final, the first token not known yet
        await asyncio.sleep(0)
        assert not last.done() and ready.count == 3
        skipped = ready.wait(2)  # layer 1 was never reported: layer 2's event covers it
        assert skipped.result() == "e2"
        ready.computed(9)
        assert last.result() == "e2" and ready.first_token == 9
        pending = LayerReadiness(2).wait(2)
        with pytest.raises(ValueError):
            ready.wait(4)
        return pending

    loop_ = asyncio.new_event_loop()
    try:
        loop_.run_until_complete(go())
        ready = LayerReadiness(2)
        waiter = loop_.run_until_complete(_wait_then_fail(ready))
        assert isinstance(waiter.exception(), Internal)
    finally:
        loop_.close()


async def _wait_then_fail(ready: LayerReadiness) -> asyncio.Future:
    waiter = ready.wait(1)
    ready.fail(Internal("failed", reason="X"))
    return waiter


def test_gpu_reporter_reports_chunk_ends_only(monkeypatch):
    """A GPU reporter reports the last layer of each of GPU_STREAM_CHUNKS chunks (1 by
    default: the last layer), and a same-host writer on a GPU chunks a streamed room the same
    way."""
    monkeypatch.delenv("PDMESH_GPU_STREAM_CHUNKS", raising=False)
    assert sorted(stream_chunk_ends(32)) == [31] and stream_chunk_layers(32) == 32
    monkeypatch.setenv("PDMESH_GPU_STREAM_CHUNKS", "4")
    assert sorted(stream_chunk_ends(32)) == [7, 15, 23, 31]
    assert stream_chunk_layers(32) == 8
    assert sorted(stream_chunk_ends(30)) == [7, 15, 23, 29]  # the last chunk is shorter
    assert sorted(stream_chunk_ends(2)) == [0, 1] and stream_chunk_layers(2) == 1


def test_gpu_stream_chunks_from_the_environment(monkeypatch):
    """PDMESH_GPU_STREAM_CHUNKS sets how many chunks a GPU room streams in; a bad value is
    refused with a message naming the variable."""
    monkeypatch.setenv("PDMESH_GPU_STREAM_CHUNKS", "1")
    assert sorted(stream_chunk_ends(32)) == [31] and stream_chunk_layers(32) == 32
    monkeypatch.setenv("PDMESH_GPU_STREAM_CHUNKS", "8")
    assert stream_chunk_layers(32) == 4 and len(stream_chunk_ends(32)) == 8
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("PDMESH_GPU_STREAM_CHUNKS", bad)
        with pytest.raises(ValueError, match="PDMESH_GPU_STREAM_CHUNKS"):
            stream_chunk_layers(32)
