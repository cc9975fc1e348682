"""KvPool: the pool tensor's shape and the page allocator's exact accounting."""

from __future__ import annotations

import threading

import pytest
import torch

from pdmesh.errors import InvalidArgument, ResourceExhausted
from pdmesh.worker.kv.layout import KvLayout
from pdmesh.worker.kv.pool import KvPool

LAYOUT = KvLayout(num_layers=3, page_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16)


def test_tensor_shape_and_dtype():
    pool = KvPool(LAYOUT, 5)
    assert pool.kv.shape == (3, 2, 5, 4, 2, 8)
    assert pool.kv.dtype == torch.float16 and pool.kv.is_contiguous()
    assert pool.num_pages == 5 and pool.num_free == 5 and pool.is_full()


def test_alloc_free_accounting():
    pool = KvPool(LAYOUT, 8)
    a = pool.alloc(3)
    b = pool.alloc(5)
    assert sorted(a + b) == list(range(8))
    assert pool.num_free == 0 and pool.num_used == 8 and not pool.is_full()
    pool.free(a)
    assert pool.num_free == 3
    pool.free(b)
    assert pool.is_full() and pool.num_free == 8
    assert pool.alloc(0) == [] and pool.is_full()


def test_exhausted_is_all_or_nothing():
    pool = KvPool(LAYOUT, 4)
    held = pool.alloc(3)
    with pytest.raises(ResourceExhausted) as info:
        pool.alloc(2)
    assert info.value.reason == "KV_POOL_EXHAUSTED"
    assert info.value.metadata == {"requested": "2", "free": "1", "total": "4"}
    assert pool.num_free == 1
    pool.free(held)
    assert pool.is_full()


@pytest.mark.parametrize("bad", [[2], [0, 0], [99], [-1]])
def test_bad_free_changes_nothing(bad):
    pool = KvPool(LAYOUT, 4)
    held = pool.alloc(2)  # pages 0 and 1
    with pytest.raises(InvalidArgument) as info:
        pool.free(held[:1] + bad if bad != [0, 0] else bad)
    assert info.value.reason == "KV_PAGE_NOT_ALLOCATED"
    assert pool.num_free == 2 and pool.num_used == 2
    pool.free(held)
    with pytest.raises(InvalidArgument):  # double free
        pool.free(held)
    assert pool.is_full()


@pytest.mark.parametrize("n", [-1, 1.5, True, "2"])
def test_bad_alloc_count(n):
    pool = KvPool(LAYOUT, 4)
    with pytest.raises(InvalidArgument):
        pool.alloc(n)
    assert pool.is_full()


def test_pool_needs_pages():
    with pytest.raises(InvalidArgument):
        KvPool(LAYOUT, 0)


def test_threads_share_the_allocator():
    pool = KvPool(LAYOUT, 64)
    errors: list[BaseException] = []

    def churn():
        try:
            for _ in range(300):
                ids = pool.alloc(4)
                pool.free(ids)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and pool.is_full()
