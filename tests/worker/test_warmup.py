"""A rank's warm-up steps that a GPU runs, exercised with the real engine on the CPU.

`_long_prompt_once` (a GPU rank's long prompts, then a decode step on a decode rank) must run each
prompt at exactly its length, in the pool's pages or a scratch pool's when the pool is too small,
and give the pool's pages back; `page_copy.warm` only compiles on the CPU; `samehost_copy.warm`
must copy one owned page into the other as a same-host transfer would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
import torch

from pdmesh.worker.engine.factory import EngineSpec, build_engine
from pdmesh.worker.kv import page_copy
from pdmesh.worker.kv.pool import KvPool
from pdmesh.worker.rank import warmup
from pdmesh.worker.rank.pages import PageBroker
from pdmesh.worker.transfer import samehost_copy


@pytest.fixture(scope="module")
def engine():
    return build_engine(EngineSpec())


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("num_pages", [2, 9, 64])
def test_long_prompts_are_exactly_their_lengths_whatever_the_pool(engine, monkeypatch, decode,
                                                                  num_pages):
    """Run as the warm-up runs it: on a thread without an event loop (the engine thread). Each
    prompt is exactly its warm-up length; it takes its pages (and the decode step's position)
    from the pool when the pool has them free, else a scratch pool of the same layout; every
    pool page comes back."""
    lengths = (17, 64)  # the CPU engine: keep it quick
    monkeypatch.setattr(warmup, "GPU_WARM_LENGTHS", lengths)
    pages = PageBroker(KvPool(engine.layout, num_pages))
    prefills, decodes = [], []
    real_prefill, real_decode = engine.prefill, engine.decode_step

    def prefill(ids, kv, page_ids, **kwargs):
        prefills.append((len(ids), kv.data_ptr() == pages.kv.data_ptr(), len(page_ids),
                         kv.shape[2]))
        return real_prefill(ids, kv, page_ids, **kwargs)

    def decode_step(kv, batch):
        decodes.append(batch[0].position)
        return real_decode(kv, batch)
    monkeypatch.setattr(engine, "prefill", prefill)
    monkeypatch.setattr(engine, "decode_step", decode_step)
    with concurrent.futures.ThreadPoolExecutor(1) as engine_thread:
        engine_thread.submit(warmup._long_prompt_once, engine, pages, decode, [None]).result()
    assert pages.pool.num_free == num_pages  # every page back
    size = engine.layout.page_size
    want = []
    for n in lengths:
        need = -(-(n + 1) // size)  # the prompt and the decode step's position
        in_pool = need <= num_pages
        want.append((n, in_pool, need, num_pages if in_pool else need))
    assert prefills == want
    assert decodes == (list(lengths) if decode else [])


def test_copy_warm_copies_one_owned_page_into_the_other(engine):
    pool = KvPool(engine.layout, 4)
    pool.kv.view(-1).copy_(torch.randn(pool.kv.numel(), dtype=torch.float64).to(pool.kv.dtype))
    before = pool.kv.clone()
    page_copy.warm(pool.kv, [1, 3])
    assert torch.equal(pool.kv[:, :, 3], before[:, :, 3])  # the CPU warm-up only compiles
    assert torch.equal(pool.kv, before)


def test_the_copier_warm_up_copies_one_owned_page_into_the_other(engine):
    """`samehost_copy.warm` runs the copier a same-host transfer makes (a GPU prefill rank's
    warm-up): page 1 lands in page 3, the rest of the pool is untouched, and the checksum is
    the reader's."""
    pool = KvPool(engine.layout, 4)
    pool.kv.view(-1).copy_(torch.randn(pool.kv.numel(), dtype=torch.float64).to(pool.kv.dtype))
    before = pool.kv.clone()
    value = asyncio.run(samehost_copy.warm(pool.kv, [1, 3]))
    assert torch.equal(pool.kv[:, :, 3], before[:, :, 1])
    assert torch.equal(pool.kv[:, :, [0, 1, 2]], before[:, :, [0, 1, 2]])
    assert value == page_copy.checksum_pages(before, torch.tensor([1]), 0, engine.layout.num_layers)


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
