"""The same-host writer splits a CPU chunk's copy over its threads (TransferConfig
`same_host_copy_threads`): the slices cover the chunk's layers once, run at the same time, their
checksums add up to the trailer's, and a slice that fails fails the transfer typed, after every
slice ended, with both pools full; a request whose destination page ids are malformed is refused
typed before anything is written. The fixtures are the contract suite's (only its same-host
mesh is used here).
"""

from __future__ import annotations

import threading

import pytest
import torch

from pdmesh.errors import DataLoss, InvalidArgument
from pdmesh.reasons import Reason
from pdmesh.worker.transfer import samehost, samehost_copy
from test_transfer_contract import LAYOUT, _expect, ends, loop, mesh, run  # noqa: F401 - fixtures

SAME_HOST = pytest.mark.parametrize("mesh", [("samehost", "packed")], indirect=True,
                                    ids=["samehost"])


class Slices:
    """Records the slices the writer copies; `barrier` makes both slices of a chunk wait for each
    other, so a test passes only if they run at the same time; `fail_at` raises in the slice
    starting at that layer (after the others ran to their end)."""

    def __init__(self, monkeypatch, fail_at: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(2, timeout=10)
        real = samehost_copy.copy_job

        def job(src_kv, dst_kv, copies, a, b, streaming=False):
            assert streaming  # a threaded slice stores with streaming stores
            with self.lock:
                self.calls.append((a, b))
            self.barrier.wait()  # BrokenBarrierError if the other slice never runs beside it
            if a == fail_at:
                raise DataLoss(f"the same-host copy failed: layers [{a}, {b})",
                               reason=Reason.KV_SAME_HOST_COPY_FAILED)
            return real(src_kv, dst_kv, copies, a, b, streaming)

        monkeypatch.setattr(samehost_copy, "copy_job", job)
        monkeypatch.setattr(samehost_copy, "SLICE_MIN_BYTES", 1)  # split the test's tiny chunks
        monkeypatch.setattr(samehost_copy, "INLINE_COPY_BYTES", 0)  # ... over threads


@SAME_HOST
def test_chunk_copied_in_concurrent_slices(mesh, run, monkeypatch):
    slices = Slices(monkeypatch)

    async def go():
        room = mesh.room()
        src, dst = mesh.src.alloc(7), mesh.dst.alloc(7)
        offer = mesh.offer(room, src, first_token=9)
        assert await mesh.fetch(room, dst) == 9  # one chunk of every layer: two slices
        await offer
        assert mesh.same(src, dst)
        assert sorted(slices.calls) == [(0, LAYOUT.num_layers // 2),
                                        (LAYOUT.num_layers // 2, LAYOUT.num_layers)]
        mesh.src.free(src)
        mesh.dst.free(dst)

    run(go())


@SAME_HOST
def test_failed_slice_fails_the_transfer_typed(mesh, run, monkeypatch):
    slices = Slices(monkeypatch, fail_at=LAYOUT.num_layers // 2)

    async def go():
        room = mesh.room()
        src, dst = mesh.src.alloc(3), mesh.dst.alloc(3)
        offer = mesh.offer(room, src, first_token=9)
        await _expect(mesh.fetch(room, dst), DataLoss, "KV_SAME_HOST_COPY_FAILED")
        err = await _expect(offer, DataLoss, "KV_SAME_HOST_COPY_FAILED")
        assert "layers [3, 6)" in err.message
        assert len(slices.calls) == 2
        mesh.src.free(src)
        mesh.dst.free(dst)

    run(go())


@SAME_HOST
@pytest.mark.parametrize("case", ["short", "out of range", "repeated"])
def test_malformed_destination_ids_fail_the_request_typed(mesh, run, monkeypatch, case):
    """A same-host request whose destination page ids are malformed (a byte count that is not 4
    per page, an id past the decode's pool, a repeated id) is refused before anything is
    written: INVALID_ARGUMENT INVALID_PAGE_IDS to the decode. The room's offer stays (a bad
    request fails the request, not the offer): a well-formed retry receives it."""
    real = samehost.packed_ids
    broken = [True]

    def bad(ids):
        if not broken[0]:
            return real(ids)
        return {"short": real(ids)[:-1],
                "out of range": real(ids[:-1]) + (1 << 20).to_bytes(4, "little"),
                "repeated": real(ids[:-1]) + real(ids[:1])}[case]

    monkeypatch.setattr(samehost, "packed_ids", bad)

    async def go():
        room = mesh.room()
        src, dst = mesh.src.alloc(3), mesh.dst.alloc(3)
        before = mesh.dst.kv.clone()
        offer = mesh.offer(room, src, first_token=9)
        err = await _expect(mesh.fetch(room, dst), InvalidArgument, "INVALID_PAGE_IDS")
        assert "destination page ids" in err.message
        assert torch.equal(mesh.dst.kv, before)  # nothing written
        assert not offer.status.terminal
        broken[0] = False
        assert await mesh.fetch(room, dst) == 9
        await offer
        assert mesh.same(src, dst)
        mesh.src.free(src)
        mesh.dst.free(dst)

    run(go())
