"""A rank's warm-up steps that a GPU runs, exercised with the real engine on the CPU.

`_long_prompt_once` (a GPU rank's long prompt, then a decode step on a decode rank) must fit its
prompt and the decode step's position in the pages it takes, give them back, and leave the
engine's output unchanged; `page_copy.warm` must copy one owned page into the other.
"""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from pdmesh.worker.engine.factory import EngineSpec, build_engine
from pdmesh.worker.kv import page_copy
from pdmesh.worker.kv.pool import KvPool
from pdmesh.worker.rank import warmup
from pdmesh.worker.rank.pages import PageBroker


@pytest.fixture(scope="module")
def engine():
    return build_engine(EngineSpec())


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("num_pages", [2, 9, 64])
def test_long_prompt_fits_its_pages_and_returns_them(engine, monkeypatch, decode, num_pages):
    """Run as the warm-up runs it: on a thread without an event loop (the engine thread)."""
    lengths = (17, 64)  # the CPU engine: keep it quick
    monkeypatch.setattr(warmup, "GPU_WARM_LENGTHS", lengths)
    pages = PageBroker(KvPool(engine.layout, num_pages))
    taken = []
    real_alloc = pages.pool.alloc
    monkeypatch.setattr(pages.pool, "alloc", lambda n: taken.append(real_alloc(n)) or taken[-1])
    with concurrent.futures.ThreadPoolExecutor(1) as engine_thread:
        engine_thread.submit(warmup._long_prompt_once, engine, pages, decode, [None]).result()
    assert pages.pool.num_free == num_pages  # every page back
    cap = max(1, num_pages // 2)  # at most half of the free pool, each length once
    want = sorted({min(-(-n // engine.layout.page_size), cap) for n in lengths})
    assert [len(ids) for ids in taken] == want


def test_copy_warm_copies_one_owned_page_into_the_other(engine):
    pool = KvPool(engine.layout, 4)
    pool.kv.view(-1).copy_(torch.randn(pool.kv.numel(), dtype=torch.float64).to(pool.kv.dtype))
    before = pool.kv.clone()
    page_copy.warm(pool.kv, [1, 3])
    assert torch.equal(pool.kv[:, :, 3], before[:, :, 3])  # the CPU warm-up only compiles
    assert torch.equal(pool.kv, before)


def test_a_failing_long_prompt_is_logged_and_gives_its_pages_back(engine, caplog):
    """A GPU whose pool leaves no room for a long prompt's activations still starts."""
    class OutOfMemory:
        layout, max_seq_len, tokenizer = engine.layout, engine.max_seq_len, engine.tokenizer

        def prefill(self, *args, **kwargs):
            raise RuntimeError("CUDA out of memory (simulated)")

    pages = PageBroker(KvPool(engine.layout, 16))
    with concurrent.futures.ThreadPoolExecutor(1) as engine_thread:
        engine_thread.submit(warmup._long_prompt_once, OutOfMemory(), pages, True, [None]).result()
    assert pages.pool.num_free == 16
    assert "warm-up prompt failed (RuntimeError: CUDA out of memory (simulated))" in caplog.text
