"""The decode rank's side of KV transfer: `KvReceiver.fetch` pulls a room's KV into its pages.

    receiver = KvReceiver("ucx", config=TransferConfig())
    pages = pool.alloc(layout.pages_for_tokens(prompt_len))
    try:
        first_token = await receiver.fetch(address, room, epoch=epoch, pool=pool, page_ids=pages,
                                           token=token, timeout=30)
    except PdmeshError:
        pool.free(pages)   # safe: fetch raises only once nothing writes into them any more
        raise

One cached link per peer address. fetch sends the typed request (BOOTSTRAPPING) and waits for the
sender to acknowledge it (a `TransferWaiting` or the status); when the link stays silent for
`answer_timeout_s` the fetch fails UNAVAILABLE KV_TRANSFER_NO_ANSWER and the link is retired (the
decode retries once, on a fresh link). Then it waits for the status
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
import functools
import hmac
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pdmesh.errors import (AlreadyExists, Cancelled, DataLoss, InvalidArgument, PdmeshError,
                           Unavailable)
from pdmesh.reasons import Reason
from pdmesh.transfer.v1 import transfer_pb2 as pb
from pdmesh.worker.engine.runtime import apply_torch_threads
from pdmesh.worker.kv.pack import checked_page_array, ids_on
from pdmesh.worker.kv.pool import KvPool
from pdmesh.worker.transfer import runs, samehost, wire
from pdmesh.worker.transfer.config import TransferConfig
from pdmesh.worker.transfer.link import Link, Transport, drain, make_transport
from pdmesh.worker.transfer.runs import PoolSide
from pdmesh.worker.transfer.staging import StagingCache
from pdmesh.worker.transfer.streams import Incoming
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
    unanswered: bool = False  # the sender never acknowledged the request (presumed lost)
    posted: int = 0  # messages posted, in plan order
    own_runs: list = field(default_factory=list)  # this side's page runs, sent in the request
    plan: runs.WirePlan | None = None  # known once the sender's OK (with its runs) arrived
    pending: list = field(default_factory=list)  # every UCX request and unpack job it started
    lent: list = field(default_factory=list)  # staging buffers not yet given back
    direct: bool = False  # same host: the sender writes into the pages itself (samehost.py)
    ended: asyncio.Future | None = None  # same host: the sender's last message came


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
        self._retired: set[Link] = set()  # links left unanswered: closed once no fetch uses them
        self._staging: StagingCache | None = None
        self._executor = ThreadPoolExecutor(self.config.copy_threads, "pdmesh-kv-unpack",
                                            initializer=apply_torch_threads)
        self._samehost = samehost.SameHostReceiver(self.config.path, self.config.connect_timeout_s)

    def state(self, room: int) -> TransferState | None:
        fetch = self._fetches.get(room)
        return fetch.status.state if fetch else None

    def abort(self, room: int, error: PdmeshError | None = None) -> bool:
        """Fail room `room`'s fetch (the sender is told); False if none is running."""
        fetch = self._fetches.get(room)
        if fetch is None:
            return False
        return fetch.status.fail(error or Cancelled(f"the decode rank aborted room {room}",
                                                    reason=Reason.KV_TRANSFER_ABORTED,
                                                    metadata={"bootstrap_room": room}))

    async def close(self) -> None:
        for room in list(self._fetches):
            self.abort(room, Cancelled("KV receiver closing", reason=Reason.KV_TRANSPORT_CLOSED))
        for link in list(self._links.values()):  # its own links, also on a shared transport
            link.close(Cancelled("KV receiver closing", reason=Reason.KV_TRANSPORT_CLOSED))
        if self._owns_transport:
            await self.transport.close()
        self._executor.shutdown(wait=True)

    async def fetch(self, address: str, room: int, *, epoch: int, pool: KvPool,
                    page_ids: list[int], token: bytes, timeout: float,
                    layers_per_chunk: int | None = None) -> int:
        """Receive room `room`'s KV from the sender at `address` into `page_ids` of `pool`;
        return the first output token. Raises the typed failure (see the module docstring)."""
        ids = checked_page_array(pool.kv, page_ids, unique=True)  # checked once, kept on the host
        if not isinstance(token, bytes) or not token:
            raise InvalidArgument("a transfer token must be non-empty bytes",
                                  reason=Reason.INVALID_TRANSFER_TOKEN)
        if room in self._fetches:
            raise AlreadyExists(f"room {room} is already being fetched by this rank",
                                reason=Reason.KV_TRANSFER_IN_PROGRESS, metadata={"bootstrap_room": room})
        layout = pool.layout
        plan = wire.ChunkPlan(layout, len(ids), layers_per_chunk or wire.ChunkPlan.layers_for(
            layout, len(ids), self.config.chunk_bytes, self.config.min_chunks))
        loop = asyncio.get_running_loop()
        fetch = _Fetch(room, secrets.randbits(64), TransferStatus(
            f"fetch room {room}", timeout,
            {TransferState.BOOTSTRAPPING: self.config.connect_timeout_s + 1.0,
             TransferState.TRANSFERRING: self.config.transfer_timeout_s}),
            loop.create_future(), loop.create_future(), loop.create_future(),
            ended=loop.create_future())
        self._fetches[room] = fetch
        try:
            return await self._run(fetch, address, epoch, pool, ids, token, plan)
        finally:
            del self._fetches[room]
            if fetch.link is not None:
                self._by_id.pop((id(fetch.link), fetch.transfer_id), None)
                self._close_if_idle(fetch.link)

    async def _run(self, fetch: _Fetch, address: str, epoch: int, pool: KvPool,
                   ids: list[int], token: bytes, plan: wire.ChunkPlan) -> int:
        status = fetch.status
        try:
            fetch.link = self._open_link(address) or await status.guard(self._link(address))
            self._by_id[(id(fetch.link), fetch.transfer_id)] = fetch
            fetch.own_runs = runs.page_runs(ids)
            request = pb.TransferRequest(
                transfer_id=fetch.transfer_id, room=fetch.room, epoch=epoch,
                layout=pool.layout.to_proto(), num_pages=len(ids),
                expected_bytes=plan.total_bytes, layers_per_chunk=plan.layers_per_chunk,
                token=token, page_runs=runs.on_wire(fetch.own_runs, len(ids)),
                direct_min_bytes=self.config.direct_min_bytes,
                max_direct_runs=self.config.max_direct_runs)
            known, pool_id = self._samehost.known(fetch.link, pool)
            if not known:
                pool_id = await status.guard(self._samehost.target(fetch.link, pool))
            if pool_id is not None:  # same host: the sender writes straight into these pages
                request.same_host.pool_id = pool_id
                request.same_host.page_ids_u32le = samehost.packed_ids(ids)
                fetch.direct = True
            fetch.request_sent = True
            # posted, not awaited (a failed send fails the fetch): the answer is what counts
            fetch.link.post_control(wire.encode(pb.TransferMessage(request=request))
                                    ).add_done_callback(functools.partial(_fail_if_unsent, status))
            # the link is up: from here the wait is for the prefill to reach the room, which a
            # burst of requests queued ahead of it may make long. It is bounded by the deadline,
            # by the link's silence (_acknowledged) and by the sender's room wait (NOT_FOUND),
            # not by the set-up bound.
            status.rebound(status.remaining())
            await self._acknowledged(fetch)
            response = await status.guard(fetch.response)
            if response.HasField("status"):
                fetch.peer_failed = True
                raise wire.failure_from_proto(response.status)
            fetch.accepted = True
            status.advance(TransferState.TRANSFERRING)
            if fetch.direct:
                # same host: nothing arrives before the trailer, and a streamed prefill may still
                # compute: bounded by the fetch's deadline (not yet per chunk, as over UCX)
                status.rebound(status.remaining())
                trailer = await status.guard(fetch.trailer)
                value = None
                if self.config.same_host_verify:
                    value = await status.guard(asyncio.get_running_loop().run_in_executor(
                        self._executor, samehost.checksum_of, pool.kv,
                        ids_on(ids, pool.kv.device), plan))
                samehost.verify_trailer(trailer, plan.total_bytes, token, value)
                status.succeed()
                return trailer.first_token
            wire_plan = self._wire_plan(fetch, plan, response)
            incoming = Incoming(fetch, wire_plan, PoolSide(wire_plan, pool.kv, ids),
                                self._staging_for(pool), self.config)
            await incoming.run(self._executor)
            trailer = await status.guard(fetch.trailer)
            _verify(trailer, plan, incoming.digest.value(), incoming.total, token)
            status.succeed()
            return trailer.first_token
        except PdmeshError as err:
            status.fail(err)
            await self._wind_down(fetch, plan, pool)
            raise status.error from None
        except Exception as err:  # noqa: BLE001 - a bug: typed, and wound down like any failure
            status.fail(wire.unexpected(err, f"the KV receiver of room {fetch.room}"))
            await self._wind_down(fetch, plan, pool)
            raise status.error from None
        except asyncio.CancelledError:
            status.fail(Cancelled(f"fetch of room {fetch.room} was cancelled",
                                  reason=Reason.KV_TRANSFER_CANCELLED))
            await self._wind_down(fetch, plan, pool)
            raise

    async def _acknowledged(self, fetch: _Fetch) -> None:
        """Wait until the sender acknowledges the request. The wait ends only after the link has
        been silent for `answer_timeout_s` since the request went out: a sender that keeps
        answering others on the same (ordered) link is alive, merely slow under load. Silence
        means the request or its answer was lost: the fetch fails UNAVAILABLE KV_TRANSFER_NO_ANSWER
        and the link is retired (new fetches open a fresh one; it closes once idle)."""
        link, loop = fetch.link, asyncio.get_running_loop()
        sent_at = loop.time()
        while True:
            quiet_until = max(sent_at, link.last_received) + self.config.answer_timeout_s
            bound = min(quiet_until - loop.time(), fetch.status.remaining())
            done, _ = await asyncio.wait({fetch.answered, fetch.status.failed},
                                         timeout=max(bound, 0.0), return_when=asyncio.FIRST_COMPLETED)
            if fetch.status.error is not None:
                raise fetch.status.error
            if done:
                return
            if max(sent_at, link.last_received) + self.config.answer_timeout_s <= loop.time():
                break  # silent for the whole bound: nothing of ours is being read
        log.warning("KV transfer of room %d: %s left the request unanswered and the link silent for "
                    "%.1f s; retiring the link", fetch.room, link.peer, self.config.answer_timeout_s)
        fetch.status.fail(Unavailable(
            f"the prefill rank at {link.peer} did not answer the transfer request for room "
            f"{fetch.room} (the link was silent for {self.config.answer_timeout_s:.1f} s)",
            reason=Reason.KV_TRANSFER_NO_ANSWER,
            metadata={"bootstrap_room": fetch.room, "state": fetch.status.state.name, "peer": link.peer}))
        fetch.unanswered = True
        self._retire(link)
        raise fetch.status.error

    def _retire(self, link: Link) -> None:
        """New fetches open a fresh link; this one closes when no fetch uses it any more."""
        for address, cached in list(self._links.items()):
            if cached is link:
                del self._links[address]
        self._retired.add(link)
        self._close_if_idle(link)

    def _close_if_idle(self, link: Link) -> None:
        if link in self._retired and not any(k[0] == id(link) for k in self._by_id):
            self._retired.discard(link)
            link.close(Unavailable(f"{link.peer} left a transfer request unanswered",
                                   reason=Reason.KV_LINK_UNRESPONSIVE, metadata={"peer": link.peer}))

    def _wire_plan(self, fetch: _Fetch, plan: wire.ChunkPlan,
                   response: pb.TransferResponse) -> runs.WirePlan:
        """The plan both sides build from both sides' runs (runs.py); DATA_LOSS if the sender's
        runs do not describe the request."""
        fetch.plan = runs.WirePlan.build(
            plan.layout, plan.num_pages, plan.layers_per_chunk, fetch.own_runs,
            runs.checked_runs(response.page_runs, plan.num_pages, from_request=False),
            min_direct_bytes=self.config.direct_min_bytes,
            max_direct_runs=self.config.max_direct_runs)
        return fetch.plan

    async def _wind_down(self, fetch: _Fetch, plan: wire.ChunkPlan, pool: KvPool) -> None:
        """Tell the sender, receive what it still owes, wait until UCX is done with it all."""
        link, grace = fetch.link, self.config.abort_grace_s
        if link is None or not fetch.request_sent:
            return
        if not fetch.peer_failed and not link.closed:
            abort = pb.TransferAbort(transfer_id=fetch.transfer_id,
                                     status=wire.failure_to_proto(fetch.status.error))
            try:
                await link.send_control(wire.encode(pb.TransferMessage(abort=abort)))
            except PdmeshError:
                pass
        if not fetch.accepted and not fetch.peer_failed and not fetch.unanswered and not link.closed:
            # the sender answers every request exactly once; OK means chunks are coming
            done, _ = await asyncio.wait({fetch.response}, timeout=grace)
            if not done:
                await drain([fetch.response], link, grace)
            elif not fetch.response.result().HasField("status"):
                fetch.accepted = True
        if fetch.direct:  # no chunk tags: wait until the sender writes no more
            if fetch.accepted:
                await samehost.wait_for_writer(fetch.ended, link, grace)
            return
        if fetch.accepted and fetch.plan is None and not link.closed:
            try:  # the OK came during the wind-down: its runs say how many messages follow
                self._wire_plan(fetch, plan, fetch.response.result())
            except PdmeshError:  # runs we cannot read: only closing the link ends its messages
                link.close(fetch.status.error)
        wire_plan = fetch.plan
        if fetch.accepted and wire_plan and fetch.posted < wire_plan.num_messages and not link.closed:
            scratch = self._staging_for(pool).take(wire_plan.max_message_bytes)
            fetch.lent.append(scratch)
            while fetch.posted < wire_plan.num_messages:
                fetch.pending.append(link.recv_data(
                    scratch, wire.chunk_tag(fetch.transfer_id, fetch.posted)))
                fetch.posted += 1
        if await drain(fetch.pending, link, grace) and self._staging is not None:
            for buf in fetch.lent:
                self._staging.give(buf)
        fetch.lent.clear()

    # -- links --------------------------------------------------------------------------------

    async def prelink(self, address: str, pool: KvPool) -> bool:
        """Open the link to the sender at `address` and offer it `pool` (the same-host hello)
        ahead of any fetch, so the first fetch finds both done; True if that sender writes
        straight into `pool`. Raises the typed failure of the connect."""
        link = await self._link(address)
        return await self._samehost.target(link, pool) is not None

    def linked(self, address: str) -> bool:
        """Whether an open link to `address` is cached."""
        link = self._links.get(address)
        return link is not None and not link.closed

    def _open_link(self, address: str) -> Link | None:
        """The cached open link to `address`, if any (no await on a fetch's hot path)."""
        link = self._links.get(address)
        return link if link is not None and not link.closed else None

    async def _link(self, address: str) -> Link:
        link = self._open_link(address)
        if link is not None:
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
        if kind == "same_host_ready":
            self._samehost.on_ready(link, body)
            return
        fetch = self._by_id.get((id(link), body.transfer_id))
        if fetch is None:
            return  # a transfer that already ended
        if kind in ("trailer", "abort") and not fetch.ended.done():
            fetch.ended.set_result(kind)
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
            fetch.status.fail(wire.failure_from_proto(body.status))

    def _link_closed(self, address: str, link: Link, error: PdmeshError) -> None:
        if self._links.get(address) is link:
            del self._links[address]
        self._samehost.link_closed(link)
        for (link_id, _), fetch in list(self._by_id.items()):
            if link_id == id(link):
                fetch.status.fail(error)
                if not fetch.ended.done():  # a closed link writes nothing more
                    fetch.ended.set_result("closed")

    def _staging_for(self, pool: KvPool) -> StagingCache:
        if self._staging is None or self._staging.device != pool.kv.device:
            self._staging = StagingCache(self.config.staging_cache_bytes, pool.kv.device)
        return self._staging


def _fail_if_unsent(status: TransferStatus, sent: asyncio.Future) -> None:
    if not sent.cancelled() and isinstance(sent.exception(), PdmeshError):
        status.fail(sent.exception())


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
            "request", reason=Reason.KV_TRANSFER_CORRUPT, metadata=problems)
