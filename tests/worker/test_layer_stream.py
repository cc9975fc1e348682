"""A prefill rank's layer streaming (`worker/rank/layer_stream.py`) with the real engine and the rank's
own `RankTransfer`, over the in-process transport: the decode's KV is bit-identical to a
colocated prefill's, and an engine that fails mid-compute fails the decode typed and returns
every page once nothing uses it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from types import SimpleNamespace

import pytest
import torch

from pdmesh.errors import Internal
from pdmesh.worker.config import InstanceConfig, RankConfig
from pdmesh.worker.engine.factory import EngineSpec, build_engine
from pdmesh.worker.engine.protocol import GREEDY
from pdmesh.worker.engine.reference import empty_kv_pool
from pdmesh.worker.kv.pool import KvPool
from pdmesh.worker.rank.kv_link import RankTransfer
from pdmesh.worker.rank.layer_stream import prefill_streamed
from pdmesh.worker.rank.pages import EngineThread, PageBroker
from pdmesh.worker.transfer import KvReceiver, make_transport


class FailingEngine:
    """The real engine, raising from inside the prefill once layer `at` is written."""

    def __init__(self, engine, at: int) -> None:
        self.engine, self.at = engine, at

    def prefill(self, ids, kv, pages, sampling, on_layer):
        def report(layer: int) -> None:
            on_layer(layer)
            if layer == self.at:
                raise RuntimeError("out of memory (simulated)")
        return self.engine.prefill(ids, kv, pages, sampling, report)


@pytest.fixture(scope="module")
def engine():
    return build_engine(EngineSpec())


def _rank(engine, num_pages=32):
    inst = InstanceConfig(role="prefill", instance_id="p", bootstrap_address="127.0.0.1:1",
                          transfer_wait_s=5.0)
    pages = PageBroker(KvPool(engine.layout, num_pages))
    transfer = RankTransfer(RankConfig(inst, 0, epoch=1), pages, transport="inproc")
    return SimpleNamespace(config=RankConfig(inst, 0, epoch=1), pages=pages, transfer=transfer,
                           engine=engine, engine_thread=EngineThread())


async def _pair(st, engine, prompt, dst: KvPool, decode_first: bool):
    """A streamed prefill of `prompt` and a decode fetching it; (prefill result, fetch result)."""
    address = await st.transfer.start()
    receiver = KvReceiver(make_transport("inproc"))
    room, token = secrets.randbits(62) + 1, secrets.token_bytes(8)
    n = engine.layout.pages_for_tokens(len(prompt))
    src, into = st.pages.alloc(n), dst.alloc(n)
    st.transfer.expect_room(room, time.monotonic() + 20)
    fetch = asyncio.ensure_future(receiver.fetch(address, room, epoch=1, pool=dst, page_ids=into,
                                                 token=token, timeout=20, layers_per_chunk=1))
    if decode_first:  # the decode's request is already waiting when the prefill starts
        await asyncio.sleep(0.05)
    try:
        results = await asyncio.gather(
            prefill_streamed(st, room, prompt, src, GREEDY, token, time.monotonic() + 20), fetch,
            return_exceptions=True)
    finally:
        st.pages.free(src)
        await receiver.close()
        await st.transfer.close()
        st.engine_thread.shutdown()
    return results, into


def test_streamed_prefill_gives_the_colocated_kv_bit_for_bit(engine):
    prompt = engine.tokenizer.encode("layer by layer, " * 6)
    st, dst = _rank(engine), KvPool(engine.layout, 32)
    (prefilled, first), into = asyncio.run(_pair(st, engine, prompt, dst, decode_first=True))
    kv = empty_kv_pool(engine, len(into))
    ref_first = engine.prefill(prompt, kv, list(range(len(into))))
    assert prefilled[0] == first == ref_first
    assert torch.equal(dst.kv[:, :, into].view(torch.uint8), kv.view(torch.uint8))
    dst.free(into)
    assert st.pages.pool.is_full() and dst.is_full()


def test_a_prefill_failing_mid_compute_fails_the_decode_typed_and_frees_everything(engine):
    prompt = engine.tokenizer.encode("this prefill will not finish " * 3)
    st, dst = _rank(engine), KvPool(engine.layout, 32)
    st.engine = FailingEngine(engine, at=1)
    (prefilled, fetched), into = asyncio.run(_pair(st, engine, prompt, dst, decode_first=True))
    assert isinstance(prefilled, RuntimeError)
    assert isinstance(fetched, Internal) and fetched.reason == "PREFILL_COMPUTE_FAILED", fetched
    assert "out of memory" in fetched.message
    dst.free(into)
    assert st.pages.pool.is_full() and dst.is_full()
