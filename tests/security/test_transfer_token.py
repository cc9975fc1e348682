"""The UCX data plane carries no credentials of its own: a prefill rank sends a room's KV only to
the receiver that presents the per-transfer token the router handed to both sides over the
(m)TLS control path. A rogue receiver that knows the room and the sender's UCX address, but not
the token, gets UNAUTHENTICATED (KV_TRANSFER_TOKEN_MISMATCH) and no byte of KV; the offer stays
for the real decode, which then receives every byte. (The same through a real prefill process:
tests/security/test_mtls_mesh.py.)
"""

from __future__ import annotations

import asyncio
import secrets

import pytest
import torch

from pdmesh.errors import Unauthenticated
from pdmesh.worker.kv.layout import KvLayout
from pdmesh.worker.kv.pack import pack
from pdmesh.worker.kv.pool import KvPool
from pdmesh.worker.transfer import KvReceiver, KvSender, TransferConfig, make_transport
from pdmesh.worker.transfer.config import apply_ucx_defaults

LAYOUT = KvLayout(num_layers=4, page_size=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16)
CONFIG = TransferConfig(room_wait_s=5.0, connect_timeout_s=3.0, chunk_bytes=4096)
EPOCH = 3


def test_knowing_the_room_and_address_is_not_enough():
    apply_ucx_defaults()

    async def go():
        sender = KvSender(make_transport("ucx"), epoch=EPOCH, config=CONFIG)
        real = KvReceiver(make_transport("ucx"), config=CONFIG)
        rogue = KvReceiver(make_transport("ucx"), config=CONFIG)
        src, dst, stolen = KvPool(LAYOUT, 16), KvPool(LAYOUT, 16), KvPool(LAYOUT, 16)
        src.kv.copy_(torch.randn(src.kv.shape).to(LAYOUT.dtype))
        address = await sender.start()
        try:
            room, token = secrets.randbits(63) or 1, secrets.token_bytes(16)  # as the router draws them
            pages, loot = src.alloc(5), stolen.alloc(5)
            # a rogue request in flight while the room is offered, then near-miss guesses
            early = asyncio.ensure_future(rogue.fetch(
                address, room, epoch=EPOCH, pool=stolen, page_ids=loot,
                token=secrets.token_bytes(16), timeout=10.0))
            await asyncio.sleep(0)
            offer = sender.offer(room, src, pages, 777, token=token, timeout=20.0)
            reasons = []
            with pytest.raises(Unauthenticated) as info:
                await early
            reasons.append(info.value.reason)
            for guess in (token[:-1], token + b"\0", bytes(16), token[:-1] + bytes([token[-1] ^ 1])):
                with pytest.raises(Unauthenticated) as info:
                    await rogue.fetch(address, room, epoch=EPOCH, pool=stolen, page_ids=loot,
                                      token=guess, timeout=10.0)
                reasons.append(info.value.reason)
            assert reasons == ["KV_TRANSFER_TOKEN_MISMATCH"] * 5
            assert not torch.any(stolen.kv.view(torch.uint8))  # not one byte reached the rogue
            assert not offer.claimed
            # the real decode, with the token, still gets the whole KV and the first token
            got = dst.alloc(5)
            assert await real.fetch(address, room, epoch=EPOCH, pool=dst, page_ids=got, token=token,
                                    timeout=10.0) == 777
            await offer
            assert torch.equal(pack(src.kv, pages).view(torch.uint8), pack(dst.kv, got).view(torch.uint8))
            assert not sender._offers and not sender._jobs
        finally:
            for end in (sender, real, rogue):
                await end.close()
                await end.transport.close()

    asyncio.run(asyncio.wait_for(go(), 60))
