"""The transfer's pure parts: wire format, chunk plan, checksum, trailer checks, states, staging."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdmesh.errors import (DataLoss, DeadlineExceeded, Internal, LayoutMismatch, NotFound,
                           Unavailable)
from pdmesh.transfer.v1 import transfer_pb2 as pb
from pdmesh.worker.kv.layout import KvLayout
from pdmesh.worker.transfer import wire
from pdmesh.worker.transfer.config import TransferConfig, apply_ucx_defaults
from pdmesh.worker.transfer.receiver import _verify
from pdmesh.worker.transfer.staging import StagingCache
from pdmesh.worker.transfer.state import TransferState, TransferStatus

LAYOUT = KvLayout(num_layers=5, page_size=2, num_kv_heads=2, head_dim=4, dtype=torch.float16)


def test_failures_round_trip_as_the_same_class():
    for error in (NotFound("gone", reason="KV_ROOM_NOT_FOUND", metadata={"bootstrap_room": 5}),
                  LayoutMismatch("differs", metadata={"dtype": "a!=b"}),
                  Unavailable("peer died", reason="KV_TRANSFER_PEER_LOST")):
        message = pb.TransferMessage(abort=pb.TransferAbort(
            transfer_id=1, status=wire.failure_to_proto(error)))
        back = wire.failure_from_proto(wire.decode(wire.encode(message)).abort.status)
        assert type(back) is type(error) and back.same_as(error)
        assert back.message == error.message and back.metadata == error.metadata


@pytest.mark.parametrize("data", [b"", b"\x00\x01garbage", b"\xff" * 9])
def test_undecodable_control_is_data_loss(data):
    with pytest.raises(DataLoss):
        wire.decode(data)


def test_chunk_plan_covers_every_layer_once():
    plan = wire.ChunkPlan(LAYOUT, num_pages=3, layers_per_chunk=2)
    assert plan.ranges == [(0, 2), (2, 4), (4, 5)]
    assert sum(plan.chunk_bytes(i) for i in range(plan.num_chunks)) == plan.total_bytes
    assert plan.max_chunk_bytes == plan.chunk_bytes(0)
    assert wire.ChunkPlan.layers_for(LAYOUT, 3, plan.layer_bytes * 2 + 1) == 2
    assert wire.ChunkPlan.layers_for(LAYOUT, 3, 1) == 1
    assert wire.ChunkPlan.layers_for(LAYOUT, 3, 1 << 40) == 5
    # layer streaming: at least `min_chunks` chunks, bytes permitting, never below one layer
    assert wire.ChunkPlan.layers_for(LAYOUT, 3, 1 << 40, min_chunks=2) == 3
    assert wire.ChunkPlan.layers_for(LAYOUT, 3, 1 << 40, min_chunks=8) == 1
    assert wire.ChunkPlan.layers_for(LAYOUT, 3, plan.layer_bytes * 2, min_chunks=2) == 2
    assert wire.ChunkPlan.layers_for(LAYOUT, 0, 1 << 20, min_chunks=2) == 3


def test_chunk_tags_differ_per_transfer_and_index():
    tags = {wire.chunk_tag(t, i) for t in (1, 2, 1 << 63) for i in range(64)}
    assert len(tags) == 3 * 64 and all(0 <= t < 1 << 63 for t in tags)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=9000), st.data())
def test_checksum_sees_any_changed_byte(payload, data):
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    before = wire.checksum(buf)
    i = data.draw(st.integers(0, len(payload) - 1))
    flip = data.draw(st.integers(1, 255))
    changed = buf.clone()
    changed[i] ^= flip
    assert wire.checksum(changed) != before


@pytest.mark.parametrize("block", [0, 1, 2, 5])
@pytest.mark.parametrize("bit", [0, 62, 63])
def test_checksum_sees_any_bit_of_a_word_in_any_block(block, bit):
    """Every block sum weighs an odd number, so a flip of any bit of one word changes the value
    (the top bit of a word in blocks 0, 2, 4, ... once went unseen: hypothesis found 8 zero
    bytes and their copy with 0x80 in the last byte summing alike)."""
    buf = torch.zeros(6 * 4096 + 8, dtype=torch.uint8)
    changed = buf.clone()
    word = changed[block * 4096 + 8: block * 4096 + 16].view(torch.int64)
    word ^= torch.tensor([1 << bit], dtype=torch.int64) if bit < 63 else torch.tensor(
        [-(1 << 63)], dtype=torch.int64)
    assert wire.checksum(changed) != wire.checksum(buf)
    one = torch.zeros(8, dtype=torch.uint8)
    flipped = one.clone()
    flipped[7] = 0x80
    assert wire.checksum(flipped) != wire.checksum(one)


def test_checksum_sees_swapped_blocks_and_lengths():
    buf = torch.randint(0, 256, (4096 * 4,), dtype=torch.uint8)
    swapped = torch.cat([buf[4096:8192], buf[:4096], buf[8192:]])
    assert wire.checksum(swapped) != wire.checksum(buf)
    assert wire.checksum(buf[:-1]) != wire.checksum(buf)
    assert wire.checksum(torch.cat([buf, torch.zeros(8, dtype=torch.uint8)])) != wire.checksum(buf)
    a, b = wire.checksum(buf[:100]), wire.checksum(buf[100:200])
    assert wire.fold(wire.fold(wire.FOLD_START, a), b) != wire.fold(wire.fold(wire.FOLD_START, b), a)


def _trailer(**kw):
    fields = dict(transfer_id=1, first_token=9, byte_count=100, checksum=42, token=b"t")
    fields.update(kw)
    return pb.TransferTrailer(**fields)


class _Plan:
    total_bytes = 100


def test_trailer_checks():
    _verify(_trailer(), _Plan, 42, 100, b"t")
    for trailer, acc, total, key in [
        (_trailer(token=b"x"), 42, 100, "token"),
        (_trailer(byte_count=99), 42, 100, "bytes"),
        (_trailer(), 42, 99, "bytes"),
        (_trailer(), 43, 100, "checksum"),
        (pb.TransferTrailer(transfer_id=1, byte_count=100, checksum=42, token=b"t"), 42, 100,
         "first_token"),
    ]:
        with pytest.raises(DataLoss) as info:
            _verify(trailer, _Plan, acc, total, b"t")
        assert info.value.reason == "KV_TRANSFER_CORRUPT" and key in info.value.metadata


def test_states_are_monotone_and_failure_wins():
    async def go():
        status = TransferStatus("t", 10, {})
        assert status.advance(TransferState.WAITING_FOR_INPUT)
        assert not status.advance(TransferState.BOOTSTRAPPING)  # never backwards
        with pytest.raises(Internal):
            status.succeed()  # only from TRANSFERRING
        failures = []
        status.on_fail(failures.append)
        assert status.fail(Unavailable("x"))
        assert not status.advance(TransferState.TRANSFERRING)
        assert not status.succeed() and not status.fail(Unavailable("y"))
        assert status.state == TransferState.FAILED and len(failures) == 1
        assert status.failed.done()
        done = TransferStatus("u", 10, {}, TransferState.TRANSFERRING)
        assert done.succeed() and not done.fail(Unavailable("late"))
        assert done.state == TransferState.SUCCESS

    asyncio.run(go())


def test_every_state_has_a_deadline():
    async def go():
        status = TransferStatus("t", 5.0, {TransferState.BOOTSTRAPPING: 0.05})
        with pytest.raises(DeadlineExceeded) as info:
            await status.guard(asyncio.sleep(1))
        assert info.value.metadata["state"] == "BOOTSTRAPPING"
        overall = TransferStatus("u", 0.05, {}, TransferState.TRANSFERRING)
        await asyncio.sleep(0.1)
        assert isinstance(overall.error, DeadlineExceeded)
        moving = TransferStatus("v", 5.0, {TransferState.WAITING_FOR_INPUT: 0.05})
        await asyncio.sleep(0.1)  # BOOTSTRAPPING has only the overall deadline
        assert moving.advance(TransferState.WAITING_FOR_INPUT)
        await asyncio.sleep(0.1)
        assert moving.error.metadata["state"] == "WAITING_FOR_INPUT"

    asyncio.run(go())


def test_staging_cache_reuses_and_caps():
    cache = StagingCache(max_bytes=1 << 20)
    a = cache.take(100_000)
    assert a.numel() == 100_000 and cache.lent == 1
    ptr = a.data_ptr()
    cache.give(a)
    b = cache.take(120_000)  # same power-of-two bucket: the same memory
    assert b.data_ptr() == ptr
    with pytest.raises(ValueError):
        cache.give(a)
    big = cache.take(2 << 20)
    cache.give(big)  # over the cap: dropped, not kept
    cache.give(b)
    assert cache.cached_bytes <= 1 << 20 and cache.lent == 0


def test_ucx_defaults_never_override_the_environment():
    env = {"UCX_TLS": "rc,sm,self"}
    applied = apply_ucx_defaults(env)
    assert env["UCX_TLS"] == "rc,sm,self" and applied["UCX_TLS"] == "rc,sm,self"
    assert env["UCX_MM_ERROR_HANDLING"] == "y" and env["UCXPY_PROGRESS_MODE"] == "blocking"


def test_config_validates():
    with pytest.raises(ValueError):
        TransferConfig(send_depth=0)
    with pytest.raises(ValueError):
        TransferConfig(room_wait_s=0)


def test_cuda_settings_chunk_no_finer_than_the_compute_reports(monkeypatch):
    """On a GPU a request has at most as many chunks as a streamed prefill reports chunk ends
    (PDMESH_GPU_STREAM_CHUNKS, 1 by default; chunks stay at most GPU_CHUNK_BYTES): a host pool
    keeps its own chunking."""
    from pdmesh.worker.transfer.config import GPU_CHUNK_BYTES

    monkeypatch.delenv("PDMESH_GPU_STREAM_CHUNKS", raising=False)
    cuda = TransferConfig(min_chunks=8).for_device("cuda:0")
    assert cuda.min_chunks == 1 and cuda.chunk_bytes == GPU_CHUNK_BYTES
    monkeypatch.setenv("PDMESH_GPU_STREAM_CHUNKS", "4")
    assert TransferConfig(min_chunks=8).for_device("cuda").min_chunks == 4
    assert TransferConfig(min_chunks=2).for_device("cuda").min_chunks == 2
    assert TransferConfig(min_chunks=8).for_device("cpu").min_chunks == 8
    monkeypatch.setenv("PDMESH_GPU_STREAM_CHUNKS", "8")
    assert TransferConfig(min_chunks=8).for_device("cuda").min_chunks == 8
