"""Bad input on the KV data plane, over real UCX in this process.

A KvSender (UCX listener) with one room on offer is sent random and malformed TransferMessage
bytes over a bare UCX link: every decodable request gets exactly one typed answer, nothing else
is answered, the link survives, the offer's pages come back, and the sender's tables end empty.
A KvReceiver is given malformed UCX addresses: each fetch fails typed, at once, and leaves
nothing behind. Afterwards a real transfer between the two still moves the KV bit for bit.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdmesh.errors import PdmeshError
from pdmesh.worker.transfer.config import TransferConfig, apply_ucx_defaults
from fuzz_messages import ADDRESSES, TEXT
from fuzz_oracle import count
from fuzz_transfer import RawPeer, accepted_ok, exchange, transfer_messages
from fuzz_wire import LoopThread

apply_ucx_defaults()  # before ucxx is first imported (by the transfer modules below)

from pdmesh.worker.kv.layout import KvLayout  # noqa: E402
from pdmesh.worker.kv.pack import pack  # noqa: E402
from pdmesh.worker.kv.pool import KvPool  # noqa: E402
from pdmesh.worker.transfer import KvReceiver, KvSender  # noqa: E402
from pdmesh.worker.transfer.ucx import UcxTransport  # noqa: E402

LAYOUT = KvLayout(num_layers=2, page_size=4, num_kv_heads=1, head_dim=8, dtype=torch.float32)
CONFIG = TransferConfig(room_wait_s=0.2, abort_grace_s=1.0, connect_timeout_s=2.0, transfer_timeout_s=3.0)
EPOCH, ROOM, TOKEN, PAGES = 5, 4242, b"fuzz-token-0123456789", [1, 3]
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))


class Side:
    """The sender, its pool and a raw peer; the receiver and its pool; on one loop."""

    async def start(self) -> "Side":
        self.sender = KvSender("ucx", epoch=EPOCH, config=CONFIG)
        self.address = await self.sender.start()
        self.src, self.dst = KvPool(LAYOUT, 8), KvPool(LAYOUT, 8)
        self.src.kv.copy_(torch.randn(self.src.kv.shape))
        self.transport = UcxTransport()
        self.peer = await RawPeer.connect(self.transport, self.address)
        self.receiver = KvReceiver("ucx", config=CONFIG)
        return self

    async def stop(self) -> None:
        await self.receiver.close()
        await self.transport.close()
        await self.sender.close()

    async def settled(self) -> None:
        """Wait (bounded) until the sender holds nothing: no offer, waiter, job or task."""
        s = self.sender
        for _ in range(200):
            if not (s._offers or s._arrivals or s._waiters or s._jobs or s._tasks):
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"sender kept state: offers {list(s._offers)} arrivals {list(s._arrivals)} "
                             f"waiters {s._waiters} jobs {len(s._jobs)} tasks {len(s._tasks)}")


@pytest.fixture(scope="module")
def side():
    loop = LoopThread()
    side = loop.run(Side().start())
    side.run = loop.run
    yield side
    loop.run(side.stop())
    loop.close()


def _acceptable(request) -> bool:
    return accepted_ok(request, ROOM, TOKEN, LAYOUT.to_proto(), LAYOUT.request_bytes(len(PAGES)),
                       len(PAGES), EPOCH)


@settings(FUZZ, max_examples=40)
@given(batch=st.lists(transfer_messages(ROOM, TOKEN, LAYOUT.to_proto()), min_size=1, max_size=10),
       aborts=st.lists(st.booleans(), max_size=10))
def test_malformed_transfer_messages_get_typed_answers(side, batch, aborts):
    async def one() -> None:
        offer = side.sender.offer(ROOM, side.src, PAGES, 7, token=TOKEN, timeout=3.0)
        await exchange(side.peer, batch, aborts, CONFIG.room_wait_s + 2.0, _acceptable,
                       "transfer.TransferMessage (in-process KvSender)")
        side.sender.abort(ROOM)
        try:
            await offer
        except PdmeshError:
            pass
        await side.settled()
    side.run(one())


@settings(FUZZ, max_examples=60)
@given(address=st.one_of(ADDRESSES, TEXT.map(lambda t: "ucx://" + t),
                         st.sampled_from(["ucx://127.0.0.1:0", "ucx://127.0.0.1:1", "ucx://0.0.0.0:1",
                                          "ucx://[::1]:1", "ucx://::1:1", "ucx://:", "ucx://",
                                          "ucx://127.0.0.1:1:2", "ucx://127.0.0.1:70000",
                                          "ucx://nonexistent.invalid:1", "UCX://127.0.0.1:1"])))
def test_malformed_addresses_fail_a_fetch_typed(side, address):
    async def one() -> None:
        pages = side.dst.alloc(len(PAGES))
        try:
            await asyncio.wait_for(side.receiver.fetch(address, ROOM, epoch=EPOCH, pool=side.dst,
                                                       page_ids=pages, token=TOKEN, timeout=3.0), 10.0)
        except PdmeshError as err:
            count("transfer.KvReceiver.fetch(address)", f"{err.code.name}/{err.reason}")
        else:
            raise AssertionError(f"fetch from {address!r} succeeded")
        finally:
            side.dst.free(pages)
        assert not side.receiver._fetches and not side.receiver._by_id
        assert side.dst.num_free == side.dst.num_pages
    side.run(one())


def test_a_real_transfer_still_works_afterwards(side):
    async def one() -> int:
        offer = side.sender.offer(ROOM, side.src, PAGES, 7, token=TOKEN, timeout=10.0)
        pages = side.dst.alloc(len(PAGES))
        first = await side.receiver.fetch(side.address, ROOM, epoch=EPOCH, pool=side.dst,
                                          page_ids=pages, token=TOKEN, timeout=10.0)
        await offer
        assert torch.equal(pack(side.src.kv, PAGES), pack(side.dst.kv, pages))
        side.dst.free(pages)
        await side.settled()
        return first
    assert side.run(one()) == 7
