"""A rank's end of the KV data plane: the `KvSender` (prefill) or `KvReceiver` (decode) it owns.

Adapts the transfer package to what a rank's servicer needs, in the rank's terms (its page
broker, absolute deadlines), and sets the UCX environment before ucxx is first imported (UCX reads
it once). A prefill rank's transfer address is its UCX listener; a decode rank needs none.
"""

from __future__ import annotations

import asyncio
import os
import time

from pdmesh import metrics
from pdmesh.errors import Cancelled, DeadlineExceeded
from pdmesh.reasons import Reason
from pdmesh.worker.config import PREFILL, RankConfig
from pdmesh.worker.rank.pages import PageBroker
from pdmesh.worker.transfer.config import TransferConfig, apply_ucx_defaults


class RankTransfer:
    def __init__(self, config: RankConfig, pages: PageBroker, transport: str = "ucx") -> None:
        inst = config.instance
        if inst.ucx_tls:
            os.environ["UCX_TLS"] = inst.ucx_tls
        device = str(pages.pool.kv.device)
        apply_ucx_defaults(device=device)  # CUDA pools: UCX's CUDA transports and protocol v2
        self.pages = pages
        self.is_prefill = inst.role == PREFILL
        tconfig = TransferConfig(room_wait_s=inst.unknown_room_wait_s,
                                 advertise_host=inst.transfer_host, min_chunks=inst.kv_min_chunks,
                                 path=inst.kv_transfer_path).for_device(device)
        if self.is_prefill:
            from pdmesh.worker.transfer.sender import KvSender
            self.sender = KvSender(transport, epoch=config.epoch, config=tconfig, device=device)
        else:
            from pdmesh.worker.transfer.receiver import KvReceiver
            self.receiver = KvReceiver(transport, config=tconfig)

    async def start(self) -> str:
        """Start listening (prefill); the address the rank publishes, or "" for a decode rank."""
        return await self.sender.start() if self.is_prefill else ""

    @staticmethod
    def _remaining(deadline: float, what: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"the request's deadline passed before {what}", reason=Reason.DEADLINE_BEFORE_TRANSFER)
        return left

    def expect_room(self, room: int, deadline: float) -> None:
        """A decode that asks for `room` before its KV is computed waits until `deadline`."""
        self.sender.expect(room, max(deadline - time.monotonic(), 0.001))

    async def send_room(self, *, room: int, page_ids: list[int], first_token: int, token: bytes,
                        deadline: float) -> None:
        """Offer the pages to the decode holding `token`; return once sent (raise if not)."""
        offer = self.sender.offer(room, self.pages.pool, page_ids, first_token, token=token,
                                  timeout=self._remaining(deadline, "the decode fetched the KV"))
        await self._counted("send", len(page_ids), self._settled(room, offer))

    def open_room(self, *, room: int, page_ids: list[int], token: bytes, deadline: float):
        """Offer the pages before their KV is computed (layer streaming, layer_stream.py): the
        Offer takes each final layer and then the first token; bounded by `deadline`."""
        return self.sender.offer(room, self.pages.pool, page_ids, None, token=token,
                                 timeout=self._remaining(deadline, "the prefill computed the KV"))

    def settle(self, room: int, offer) -> asyncio.Task:
        """A task that ends once `offer` is sent (or raises its failure) and nothing uses its
        pages any more; cancelling it aborts the offer first."""
        return asyncio.ensure_future(self._counted("send", len(offer.page_ids),
                                                   self._settled(room, offer)))

    async def _settled(self, room: int, offer) -> None:
        """Await `offer`. If the caller is cancelled (its client went away), abort the offer and wait
        until no pack thread or UCX send uses its pages any more: the caller frees them next."""
        waiter = asyncio.ensure_future(_awaited(offer))
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # raised through the shield
        try:
            await asyncio.shield(waiter)
        except asyncio.CancelledError:
            self.sender.abort(room, Cancelled(f"the prefill request for room {room} was cancelled",
                                              reason=Reason.KV_TRANSFER_CANCELLED, metadata={"bootstrap_room": room}))
            await asyncio.wait([waiter])
            raise

    def decode_asked(self, room: int) -> bool:
        """Whether a decode's transfer request for `room` has reached this (prefill) rank."""
        return self.sender.requested(room)

    async def fetch_room(self, *, peer: str, room: int, epoch: int, page_ids: list[int], token: bytes,
                         deadline: float) -> int:
        """Pull `room`'s KV from the prefill rank at `peer` into `page_ids`; the first token."""
        return await self._counted("receive", len(page_ids), self.receiver.fetch(
            peer, room, epoch=epoch, pool=self.pages.pool, page_ids=page_ids, token=token,
            timeout=self._remaining(deadline, "the KV arrived")))

    async def prelink(self, peer: str) -> bool:
        """Decode: open the link to the prefill rank at `peer` and offer it this rank's pool
        (prelink.py); True if KV from it is written straight into the pool."""
        return await self.receiver.prelink(peer, self.pages.pool)

    def linked(self, peer: str) -> bool:
        return self.receiver.linked(peer)

    async def _counted(self, side: str, num_pages: int, transfer):
        """Await `transfer`, counting it in pdmesh_transfers_total and, when whole, its bytes and time."""
        started, ok = time.perf_counter(), False
        try:
            result = await transfer
            ok = True
            return result
        finally:
            metrics.transfer_done(side, self.pages.layout.request_bytes(num_pages),
                                  time.perf_counter() - started, ok)

    def abort(self, room: int, reason: str = "") -> bool:
        end = self.sender if self.is_prefill else self.receiver
        return end.abort(room)

    async def close(self) -> None:
        await (self.sender if self.is_prefill else self.receiver).close()


async def _awaited(awaitable):
    return await awaitable
