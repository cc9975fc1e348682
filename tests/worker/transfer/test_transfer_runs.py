"""The wire plan of page runs (runs.py), the checksum computed in place (digest.py), and the
pool's run allocator (kv/pool.py)."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdmesh.errors import DataLoss, InvalidArgument
from pdmesh.worker.kv.layout import KvLayout
from pdmesh.worker.kv.pool import KvPool
from pdmesh.worker.transfer import digest, runs, wire

LAYOUT = KvLayout(num_layers=5, page_size=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)
PIECE = LAYOUT.page_bytes_per_layer  # 64 bytes


def _ids(run_lengths: list[int], seed: int) -> list[int]:
    """Page ids forming exactly these runs (runs placed apart in a shuffled order)."""
    starts = list(range(0, 1000 * len(run_lengths), 1000))
    random.Random(seed).shuffle(starts)
    return [s + i for s, r in zip(starts, run_lengths) for i in range(r)]


def test_page_runs_and_their_checks():
    assert runs.page_runs([7, 8, 9, 2, 3, 5]) == [3, 2, 1]
    assert runs.page_runs(torch.tensor([4])) == [1] and runs.page_runs([]) == []
    assert runs.checked_runs([], 3, from_request=True) == [1, 1, 1]
    # single pages travel as no runs (the protocol's meaning of none), and read back the same
    assert runs.on_wire([1, 1, 1], 3) == [] and runs.on_wire([2, 1], 3) == [2, 1]
    assert runs.checked_runs(runs.on_wire([1, 1, 1], 3), 3, from_request=False) == [1, 1, 1]
    with pytest.raises(InvalidArgument):
        runs.checked_runs([2, 2], 3, from_request=True)
    with pytest.raises(DataLoss):
        runs.checked_runs([3, 0], 3, from_request=False)


run_lists = st.lists(st.integers(1, 9), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(run_lists, st.data(), st.integers(1, 5), st.integers(0, 4 * PIECE), st.integers(0, 3))
def test_plan_covers_every_piece_once_and_in_place_blocks_are_runs_on_both_sides(
        recv, data, per_chunk, min_bytes, max_runs):
    n = sum(recv)
    send = data.draw(st.lists(st.integers(1, n), min_size=1).filter(lambda r: sum(r) >= n)
                     .map(lambda r: _trim(r, n)))
    plan = runs.WirePlan.build(LAYOUT, n, per_chunk, recv, send, min_direct_bytes=min_bytes,
                               max_direct_runs=max_runs)
    src, dst = _ids(send, 1), _ids(recv, 2)
    seen = []
    for c, msgs in enumerate(plan.chunks):
        a, b = plan.ranges[c]
        for m in msgs:
            assert m.chunk == c
            if m.direct:
                for ids in (src, dst):  # one block of consecutive pages on both sides
                    block = ids[m.start:m.start + m.length]
                    assert block == list(range(block[0], block[0] + m.length))
                assert m.length * PIECE >= min_bytes
                seen += [(m.layer, m.half, i) for i in range(m.start, m.start + m.length)]
            else:
                seen += [(layer, h, i) for layer in range(a, b) for h in (0, 1)
                         for i in plan.packed]
    assert sorted(seen) == [(layer, h, i) for layer in range(5) for h in (0, 1) for i in range(n)]
    assert [m.index for c in plan.chunks for m in c] == list(range(plan.num_messages))
    assert sum(m.nbytes for c in plan.chunks for m in c) == plan.total_bytes
    assert len(plan.direct) <= max_runs


def _trim(lengths: list[int], n: int) -> list[int]:
    out, left = [], n
    for r in lengths:
        if left:
            out.append(min(r, left))
            left -= out[-1]
    return out


def test_no_runs_from_a_peer_is_the_packed_format():
    plan = runs.WirePlan.build(LAYOUT, 6, 2, [6], [], min_direct_bytes=0, max_direct_runs=0)
    assert [len(c) for c in plan.chunks] == [1, 1, 1] and not plan.direct
    assert [m.nbytes for c in plan.chunks for m in c] == [wire.ChunkPlan(LAYOUT, 6, 2)
                                                         .chunk_bytes(i) for i in range(3)]


def test_pool_side_views_are_the_pages():
    pool = KvPool(LAYOUT, 12)
    pool.kv.view(torch.int16).random_(-100, 100)
    plan = runs.WirePlan.build(LAYOUT, 4, 5, [3, 1], [4], min_direct_bytes=2 * PIECE,
                               max_direct_runs=4)
    side = runs.PoolSide(plan, pool.kv, [3, 4, 5, 9])
    m = plan.chunks[0][3]  # layer 1, V, the run of 3
    assert (m.layer, m.half, m.length) == (1, 1, 3)
    assert torch.equal(side.block(m), pool.kv[1, 1, 3:6].reshape(-1).view(torch.uint8))
    side.block(m).fill_(7)  # a view of the pool, not a copy: bytes received there land in it
    assert torch.equal(pool.kv[1, 1, 3:6].view(torch.uint8), torch.full_like(
        pool.kv[1, 1, 3:6].view(torch.uint8), 7))
    assert side.packed_ids.tolist() == [9]


@pytest.mark.parametrize("nbytes", [0, 8, 4096, 4096 * 3 + 40, 13, 100_003])
@pytest.mark.parametrize("offset", [0, 8, 3])
def test_digest_is_the_wire_checksum(nbytes, offset):
    data = torch.randint(0, 256, (nbytes + offset,), dtype=torch.uint8)[offset:]
    assert digest.combine(tuple(digest.parts(data).tolist()), nbytes) == wire.checksum(data)
    d = digest.Digest()
    d.add(data)
    d.add(data[: nbytes // 2])
    want = wire.fold(wire.fold(wire.FOLD_START, wire.checksum(data)),
                     wire.checksum(data[: nbytes // 2]))
    assert d.value() == want


def test_pool_hands_out_runs_best_fit_and_merges_on_free():
    pool = KvPool(LAYOUT, 20)
    a, b, c = pool.alloc(4), pool.alloc(3), pool.alloc(5)
    assert (a, b, c) == ([0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11])
    pool.free(b)  # free runs: 3 (at 4), 8 (at 12)
    assert pool.free_runs() == [3, 8]
    assert pool.alloc(2) == [4, 5]  # the smallest run that fits
    assert pool.alloc(8) == list(range(12, 20))
    assert pool.free_runs() == [1]
    pool.free(a)
    pool.free(c)
    assert pool.free_runs() == [4, 6]  # 0-3, and page 6 merged with 7-11
    assert pool.alloc(7) == [6, 7, 8, 9, 10, 11, 0]  # no run fits: the longest runs first


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 9)), max_size=60))
def test_pool_accounting_is_exact_under_any_sequence(ops):
    pool, held = KvPool(LAYOUT, 24), []
    for take, n in ops:
        if take and n <= pool.num_free:
            got = pool.alloc(n)
            assert len(got) == len(set(got)) == n
            assert not set(got) & {p for h in held for p in h}
            held.append(got)
        elif held:
            pool.free(held.pop(n % len(held)))
        used = sum(len(h) for h in held)
        assert pool.num_used == used and pool.num_free == 24 - used
        assert sum(pool.free_runs()) == 24 - used
        # the size index is exactly the free runs (best fit reads only the index)
        assert pool._by_size == sorted((n, start) for start, n in pool._runs.items())
    for h in held:
        pool.free(h)
    assert pool.is_full() and pool.free_runs() == [24]


def test_a_request_of_no_pages_is_one_empty_message_per_chunk():
    plan = runs.WirePlan.build(LAYOUT, 0, 2, [], [], min_direct_bytes=0, max_direct_runs=4)
    assert [[m.nbytes for m in c] for c in plan.chunks] == [[0], [0], [0]]


@pytest.mark.parametrize("piece", [4096, 4096 * 2 + 512, 40, 13])
def test_rows_parts_equal_parts_of_each_row(piece):
    """One reduction over strided pool rows (a run's blocks of several layers) gives each
    block's own parts: the digest of direct messages batched per chunk."""
    pool = torch.randint(0, 256, (3, 2, 5 * piece), dtype=torch.uint8)
    rows = pool[:, :, piece:4 * piece]  # strided: rows 3 pieces long, the pool 5
    got = digest.rows_parts(rows)
    assert got.shape == (3, 2, 2)
    for layer in range(3):
        for half in range(2):
            block = rows[layer, half].contiguous()
            assert got[layer, half].tolist() == digest.parts(block).tolist()
    d = digest.Digest()
    d.add_rows(got.reshape(-1, 2), [3 * piece] * 6)
    want = wire.FOLD_START
    for row in rows.reshape(-1, 3 * piece):
        want = wire.fold(want, wire.checksum(row.contiguous()))
    assert d.value() == want
