"""The decode rank's side of KV transfer: `KvReceiver.fetch` pulls a room's KV into its pages.

    receiver = KvReceiver("ucx", config=TransferConfig())
    pages = pool.alloc(layout.pages_for_tokens(prompt_len))
    try:
        first_token = await receiver.fetch(address, room, epoch=epoch, pool=pool, page_ids=pages,
                                           token=token, timeout=30)
    except PdmeshError:
        pool.free(pages)   # safe: fetch raises only once nothing writes into them any more
        raise

One cached link per peer address. fetch sends the typed request (BOOTSTRAPPING) and waits at
most `answer_timeout_s` for the sender to acknowledge it (a `TransferWaiting` or the status); a
sender that does not answer gets its link closed as unresponsive and the fetch fails UNAVAILABLE
KV_TRANSFER_NO_ANSWER (the decode retries once on a fresh link). Then it waits for the status
(WAITING_FOR_INPUT: the prefill may not have offered the room yet), bounded by how long the
sender said it would wait (each `TransferWaiting` renews it) plus `answer_timeout_s`, then
(TRANSFERRING, bounded by `transfer_timeout_s` without a chunk arriving: with layer streaming the
prefill may still compute later layers) keeps `recv_window` chunk receives posted into reused staging buffers, unpacks
each arrived chunk in a worker thread while the next ones arrive, and finally checks the trailer:
first token present, byte count, checksum, per-transfer token. Any mismatch is DATA_LOSS and the
fetch fails (the pages' content is then undefined: nothing is committed to the request).

On any failure (deadline, `abort(room)`, the peer's abort, a dead peer, the caller's task being
cancelled) the receiver tells the sender (unless the sender told it), receives the remaining
chunk tags into a scratch buffer (an aborted sender completes them with empty messages), and
returns only when UCX reports every receive finished or cancelled: late bytes can never land in
pages or buffers that were handed to someone else. A peer that does not finish within
`abort_grace_s` gets its link closed, which makes UCX cancel the receives.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pdmesh.errors import (AlreadyExists, Cancelled, DataLoss, InvalidArgument, PdmeshError,
                           Unavailable)
from pdmesh.transfer.v1 import transfer_pb2 as pb
from pdmesh.worker.kv.pack import check_page_ids, unpack_checked
from pdmesh.worker.kv.pool import KvPool
from pdmesh.worker.transfer import wire
from pdmesh.worker.transfer.config import TransferConfig
from pdmesh.worker.transfer.link import Link, Transport, drain, make_transport
from pdmesh.worker.transfer.staging import StagingCache
from pdmesh.worker.transfer.state import TransferState, TransferStatus

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Fetch:
    room: int
    transfer_id: int
    status: TransferStatus
    response: asyncio.Future
    trailer: asyncio.Future
    answered: asyncio.Future  # the sender acknowledged the request (waiting, or its status)
    link: Link | None = None
    request_sent: bool = False
    accepted: bool = False
    peer_failed: bool = False
    posted: int = 0
    pending: list = field(default_factory=list)  # every UCX request and unpack job it started
    lent: list = field(default_factory=list)  # staging buffers not yet given back


class KvReceiver:
    """Fetches rooms' KV from prefill ranks into this rank's pool."""

    def __init__(self, transport: Transport | str = "ucx", *,
                 config: TransferConfig | None = None) -> None:
        self.config = config or TransferConfig()
        self._owns_transport = isinstance(transport, str)
        self.transport = make_transport(transport) if isinstance(transport, str) else transport
        self._links: dict[str, Link] = {}
        self._connecting: dict[str, asyncio.Future] = {}
        self._fetches: dict[int, _Fetch] = {}
        self._by_id: dict[tuple[int, int], _Fetch] = {}
        self._staging: StagingCache | None = None
        self._executor = ThreadPoolExecutor(self.config.copy_threads, "pdmesh-kv-unpack")

    def state(self, room: int) -> TransferState | None:
        fetch = self._fetches.get(room)
        return fetch.status.state if fetch else None

    def abort(self, room: int, error: PdmeshError | None = None) -> bool:
        """Fail room `room`'s fetch (the sender is told); False if none is running."""
        fetch = self._fetches.get(room)
        if fetch is None:
            return False
        return fetch.status.fail(error or Cancelled(f"the decode rank aborted room {room}",
                                                    reason="KV_TRANSFER_ABORTED",
                                                    metadata={"room": room}))

    async def close(self) -> None:
        for room in list(self._fetches):
            self.abort(room, Cancelled("KV receiver closing", reason="KV_TRANSPORT_CLOSED"))
        for link in list(self._links.values()):  # its own links, also on a shared transport
            link.close(Cancelled("KV receiver closing", reason="KV_TRANSPORT_CLOSED"))
        if self._owns_transport:
            await self.transport.close()
        self._executor.shutdown(wait=True)

    async def fetch(self, address: str, room: int, *, epoch: int, pool: KvPool,
                    page_ids: list[int], token: bytes, timeout: float,
                    layers_per_chunk: int | None = None) -> int:
        """Receive room `room`'s KV from the sender at `address` into `page_ids` of `pool`;
        return the first output token. Raises the typed failure (see the module docstring)."""
        ids = check_page_ids(pool.kv, page_ids, unique=True)  # on the pool's device, checked once
        if not isinstance(token, bytes) or not token:
            raise InvalidArgument("a transfer token must be non-empty bytes",
                                  reason="INVALID_TRANSFER_TOKEN")
        if room in self._fetches:
            raise AlreadyExists(f"room {room} is already being fetched by this rank",
                                reason="KV_TRANSFER_IN_PROGRESS", metadata={"room": room})
        layout = pool.layout
        plan = wire.ChunkPlan(layout, len(ids), layers_per_chunk or wire.ChunkPlan.layers_for(
            layout, len(ids), self.config.chunk_bytes, self.config.min_chunks))
        loop = asyncio.get_running_loop()
        fetch = _Fetch(room, secrets.randbits(64), TransferStatus(
            f"fetch room {room}", timeout,
            {TransferState.BOOTSTRAPPING: self.config.connect_timeout_s + 1.0,
             TransferState.TRANSFERRING: self.config.transfer_timeout_s}),
            loop.create_future(), loop.create_future(), loop.create_future())
        self._fetches[room] = fetch
        try:
            return await self._run(fetch, address, epoch, pool, ids, token, plan)
        finally:
            del self._fetches[room]
            if fetch.link is not None:
                self._by_id.pop((id(fetch.link), fetch.transfer_id), None)

    async def _run(self, fetch: _Fetch, address: str, epoch: int, pool: KvPool,
                   ids: torch.Tensor, token: bytes, plan: wire.ChunkPlan) -> int:
        status = fetch.status
        try:
            fetch.link = await status.guard(self._link(address))
            self._by_id[(id(fetch.link), fetch.transfer_id)] = fetch
            request = pb.TransferRequest(
                transfer_id=fetch.transfer_id, room=fetch.room, epoch=epoch,
                layout=pool.layout.to_proto(), num_pages=len(ids),
                expected_bytes=plan.total_bytes, layers_per_chunk=plan.layers_per_chunk,
                token=token)
            fetch.request_sent = True
            await status.guard(fetch.link.send_control(wire.encode(pb.TransferMessage(
                request=request))))
            await self._acknowledged(fetch)
            response = await status.guard(fetch.response)
            if response.HasField("failure"):
                fetch.peer_failed = True
                raise wire.failure_from_proto(response.failure)
            fetch.accepted = True
            status.advance(TransferState.TRANSFERRING)
            acc, total = await self._receive(fetch, pool, ids, plan)
            trailer = await status.guard(fetch.trailer)
            _verify(trailer, plan, acc, total, token)
            status.succeed()
            return trailer.first_token
        except PdmeshError as err:
            status.fail(err)
            await self._wind_down(fetch, plan, pool)
            raise status.error from None
        except asyncio.CancelledError:
            status.fail(Cancelled(f"fetch of room {fetch.room} was cancelled",
                                  reason="KV_TRANSFER_CANCELLED"))
            await self._wind_down(fetch, plan, pool)
            raise

    async def _acknowledged(self, fetch: _Fetch) -> None:
        """Wait (bounded) until the sender acknowledges the request. No answer means the request
        or its answer was lost: the link is closed as unresponsive and the fetch fails typed."""
        bound = min(self.config.answer_timeout_s, fetch.status.remaining())
        done, _ = await asyncio.wait({fetch.answered, fetch.status.failed}, timeout=bound,
                                     return_when=asyncio.FIRST_COMPLETED)
        if done:
            if fetch.status.error is not None:
                raise fetch.status.error
            return
        link = fetch.link
        log.warning("KV transfer of room %d: %s did not answer the request within %.1f s; closing "
                    "the link", fetch.room, link.peer, bound)
        fetch.status.fail(Unavailable(
            f"the prefill rank at {link.peer} did not answer the transfer request for room "
            f"{fetch.room} within {bound:.1f} s", reason="KV_TRANSFER_NO_ANSWER",
            metadata={"room": fetch.room, "state": fetch.status.state.name, "peer": link.peer}))
        link.close(Unavailable(f"{link.peer} left a transfer request unanswered",
                               reason="KV_LINK_UNRESPONSIVE", metadata={"peer": link.peer}))
        raise fetch.status.error

    async def _receive(self, fetch: _Fetch, pool: KvPool, ids: torch.Tensor,
                       plan: wire.ChunkPlan) -> tuple[int, int]:
        staging = self._staging_for(pool)
        loop = asyncio.get_running_loop()
        slots: dict[int, tuple[asyncio.Future, torch.Tensor]] = {}

        def post() -> None:
            index = fetch.posted
            buf = staging.take(plan.chunk_bytes(index))
            fetch.lent.append(buf)
            future = fetch.link.recv_data(buf, wire.chunk_tag(fetch.transfer_id, index))
            fetch.pending.append(future)
            slots[index] = (future, buf)
            fetch.posted += 1

        while fetch.posted < min(self.config.recv_window, plan.num_chunks):
            post()
        acc, total = wire.FOLD_START, 0
        for index, (a, b) in enumerate(plan.ranges):
            future, buf = slots.pop(index)
            await fetch.status.guard(future)
            fetch.status.rebound(self.config.transfer_timeout_s)  # progress (a streamed prefill
            # may still compute later layers: the bound is per chunk, not the whole transfer)
            if fetch.posted < plan.num_chunks:
                post()  # the next receive lands while this chunk unpacks
            job = loop.run_in_executor(self._executor, _unpack_chunk, buf, pool.kv, ids, a, b)
            fetch.pending.append(job)
            acc = wire.fold(acc, await fetch.status.guard(job))
            total += buf.numel()
            fetch.lent.remove(buf)
            staging.give(buf)
        return acc, total

    async def _wind_down(self, fetch: _Fetch, plan: wire.ChunkPlan, pool: KvPool) -> None:
        """Tell the sender, receive what it still owes, wait until UCX is done with it all."""
        link, grace = fetch.link, self.config.abort_grace_s
        if link is None or not fetch.request_sent:
            return
        if not fetch.peer_failed and not link.closed:
            abort = pb.TransferAbort(transfer_id=fetch.transfer_id,
                                     failure=wire.failure_to_proto(fetch.status.error))
            try:
                await link.send_control(wire.encode(pb.TransferMessage(abort=abort)))
            except PdmeshError:
                pass
        if not fetch.accepted and not fetch.peer_failed and not link.closed:
            # the sender answers every request exactly once; OK means chunks are coming
            done, _ = await asyncio.wait({fetch.response}, timeout=grace)
            if not done:
                await drain([fetch.response], link, grace)
            elif not fetch.response.result().HasField("failure"):
                fetch.accepted = True
        if fetch.accepted and fetch.posted < plan.num_chunks and not link.closed:
            scratch = self._staging_for(pool).take(plan.max_chunk_bytes)
            fetch.lent.append(scratch)
            while fetch.posted < plan.num_chunks:
                fetch.pending.append(link.recv_data(
                    scratch, wire.chunk_tag(fetch.transfer_id, fetch.posted)))
                fetch.posted += 1
        if await drain(fetch.pending, link, grace) and self._staging is not None:
            for buf in fetch.lent:
                self._staging.give(buf)
        fetch.lent.clear()

    # -- links --------------------------------------------------------------------------------

    async def _link(self, address: str) -> Link:
        link = self._links.get(address)
        if link is not None and not link.closed:
            return link
        connecting = self._connecting.get(address)
        if connecting is None:
            connecting = asyncio.ensure_future(self._connect(address))
            self._connecting[address] = connecting
            connecting.add_done_callback(lambda _: self._connecting.pop(address, None))
        return await connecting

    async def _connect(self, address: str) -> Link:
        link = await self.transport.connect(address, self.config.connect_timeout_s)
        link.on_control = lambda data: self._on_control(link, data)
        link.on_closed = lambda error: self._link_closed(address, link, error)
        self._links[address] = link
        return link

    def _on_control(self, link: Link, data: bytes) -> None:
        try:
            message = wire.decode(data)
        except PdmeshError as err:
            log.warning("bad control message from %s: %s", link.peer, err)
            return
        kind = message.WhichOneof("body")
        body = getattr(message, kind)
        fetch = self._by_id.get((id(link), body.transfer_id))
        if fetch is None:
            return  # a transfer that already ended
        if kind in ("waiting", "response") and not fetch.answered.done():
            fetch.answered.set_result(None)
        if kind == "waiting":
            fetch.status.advance(TransferState.WAITING_FOR_INPUT)
            if fetch.status.state == TransferState.WAITING_FOR_INPUT:
                fetch.status.rebound(body.wait_ms / 1e3 + self.config.answer_timeout_s)
        elif kind == "response" and not fetch.response.done():
            fetch.response.set_result(body)
        elif kind == "trailer" and not fetch.trailer.done():
            fetch.trailer.set_result(body)
        elif kind == "abort":
            fetch.peer_failed = True
            fetch.status.fail(wire.failure_from_proto(body.failure))

    def _link_closed(self, address: str, link: Link, error: PdmeshError) -> None:
        if self._links.get(address) is link:
            del self._links[address]
        for (link_id, _), fetch in list(self._by_id.items()):
            if link_id == id(link):
                fetch.status.fail(error)

    def _staging_for(self, pool: KvPool) -> StagingCache:
        if self._staging is None or self._staging.device != pool.kv.device:
            self._staging = StagingCache(self.config.staging_cache_bytes, pool.kv.device)
        return self._staging


def _verify(trailer: pb.TransferTrailer, plan: wire.ChunkPlan, acc: int, total: int,
            token: bytes) -> None:
    problems = {}
    if not trailer.HasField("first_token"):
        problems["first_token"] = "missing"
    if not hmac.compare_digest(trailer.token, token):
        problems["token"] = "differs"
    if trailer.byte_count != plan.total_bytes or total != plan.total_bytes:
        problems["bytes"] = f"expected {plan.total_bytes}, trailer {trailer.byte_count}, got {total}"
    if trailer.checksum != acc:
        problems["checksum"] = f"trailer {trailer.checksum:#x}, received {acc:#x}"
    if problems:
        raise DataLoss("KV transfer arrived damaged (" + "; ".join(
            f"{k}: {v}" for k, v in problems.items()) + "); nothing was committed, retry the "
            "request", reason="KV_TRANSFER_CORRUPT", metadata=problems)


def _unpack_chunk(buf: torch.Tensor, kv: torch.Tensor, ids: torch.Tensor, a: int, b: int) -> int:
    """Worker thread: checksum `buf`, then unpack it into layers [a, b) of the pages."""
    value = wire.checksum(buf)
    staging = buf.view(kv.dtype).view((b - a, 2, ids.numel()) + tuple(kv.shape[3:]))
    unpack_checked(staging, kv, ids, a, b)
    if kv.is_cuda:
        torch.cuda.current_stream(kv.device).synchronize()
    return value
