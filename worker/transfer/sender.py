"""The prefill rank's side of KV transfer: `KvSender` holds offered rooms and serves requests.

    sender = KvSender("ucx", epoch=instance_epoch, config=TransferConfig())
    address = await sender.start()        # publish in the instance info (per rank)
    ...                                   # prefill computes room R's KV into `pages`
    offer = sender.offer(R, pool, pages, first_token, token=token, timeout=30)
    # or offer before computing (first_token=None), then offer.layer_done(i) per layer and
    # offer.computed(first_token): chunk i leaves once its layers are final (layers.py)
    try:
        await offer                       # sent (or raises the typed failure)
    finally:
        pool.free(pages)                  # safe either way: nothing touches them any more

Every request that passes the first checks is acknowledged at once (`TransferWaiting`, with how
long the sender may still wait for the room; again whenever that wait grows), so the decode can
bound its wait for the status. A request for a room answers with one status before any KV moves:
EPOCH_MISMATCH at once for a decode that resolved an older process; NOT_FOUND when the room is not
offered within `room_wait_s` (or the `expect()` deadline), UNAUTHENTICATED for a wrong token
(the offer stays for the right decode), FAILED_PRECONDITION for an epoch, layout or size
mismatch (the offer fails too: it can never succeed), or OK. After OK it sends every chunk tag
exactly once: packing chunk i+1 (worker thread) while chunk i is on the wire, then the trailer;
on an abort (either side) it stops packing and completes the remaining tags with empty messages.
`await offer` returns or raises only when no UCX request or pack thread uses the pages or their
staging buffers any more.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from pdmesh.errors import (AlreadyExists, Cancelled, EpochMismatch, FailedPrecondition,
                           InvalidArgument, NotFound, PdmeshError, Unauthenticated,
                           Unavailable)
from pdmesh.reasons import Reason
from pdmesh.rules import validate_room
from pdmesh.transfer.v1 import transfer_pb2 as pb
from pdmesh.worker.engine.runtime import apply_torch_threads
from pdmesh.worker.kv.layout import KvLayout
from pdmesh.worker.kv.pack import checked_page_array
from pdmesh.worker.kv.pool import KvPool
from pdmesh.worker.transfer import digest, runs, samehost, wire
from pdmesh.worker.transfer.config import TransferConfig
from pdmesh.worker.transfer.link import Link, Transport, drain, make_transport
from pdmesh.worker.transfer.offer import Offer
from pdmesh.worker.transfer.runs import PoolSide
from pdmesh.worker.transfer.streams import Outgoing
from pdmesh.worker.transfer.staging import StagingCache
from pdmesh.worker.transfer.state import TransferState, TransferStatus

log = logging.getLogger(__name__)
_EMPTY = torch.empty(0, dtype=torch.uint8)


class KvSender:
    """Serves KV transfer requests for the rooms this rank offers."""

    def __init__(self, transport: Transport | str = "ucx", *, epoch: int,
                 config: TransferConfig | None = None, device: str | None = None) -> None:
        self.config = config or TransferConfig()
        self._owns_transport = isinstance(transport, str)
        self.transport = make_transport(transport) if isinstance(transport, str) else transport
        self.epoch = epoch
        self.address: str | None = None
        self._offers: dict[int, Offer] = {}
        self._arrivals: dict[int, asyncio.Event] = {}
        self._expected: dict[int, float] = {}
        self._waiters: dict[int, int] = {}  # room -> requests waiting for its offer
        self._expected_prune_at = 1024
        self._jobs: dict[tuple[int, int], asyncio.Future] = {}  # (link, transfer id) -> abort
        self._tasks: set[asyncio.Task] = set()
        self._staging: StagingCache | None = None
        self._executor = ThreadPoolExecutor(
            max(self.config.copy_threads, self.config.same_host_copy_threads), "pdmesh-kv-pack",
            initializer=apply_torch_threads)
        # same host: the decodes' pools this rank mapped (samehost.py); `device`: this rank's pool
        self._samehost = samehost.SameHostSender(self.config.path)
        self._device = None if device is None else torch.device(device)

    async def start(self) -> str:
        """Start listening; return the address to publish for this rank."""
        self.address = await self.transport.listen(self._accept, self.config.advertise_host,
                                                   self.config.listen_port)
        return self.address

    def offer(self, room: int, pool: KvPool, page_ids: list[int], first_token: int | None, *,
              token: bytes, timeout: float) -> Offer:
        """Hold `page_ids` of `pool` for room `room` until a decode with `token` takes them, or
        `timeout` seconds pass (DEADLINE_EXCEEDED). Await the returned Offer.

        `first_token=None` offers the room before its KV is computed: report each final layer
        with `offer.layer_done(i)` and the end with `offer.computed(first_token)` (or fail it
        with `abort`); chunks leave as their layers become final (layers.py)."""
        if room in self._offers:
            raise FailedPrecondition(f"room {room} is already offered by this rank",
                                     reason=Reason.KV_ROOM_ALREADY_OFFERED, metadata={"bootstrap_room": room})
        if not isinstance(token, bytes) or not token:
            raise InvalidArgument("a transfer token must be non-empty bytes",
                                  reason=Reason.INVALID_TRANSFER_TOKEN)
        page_ids = checked_page_array(pool.kv, page_ids, unique=False)  # INVALID_ARGUMENT now
        offer = Offer(room, pool, page_ids, first_token, token, timeout, self.config)
        self._offers[room] = offer
        offer.status.on_fail(lambda err, o=offer: self._offer_failed(o))
        self._arrival(room).set()
        return offer

    def expect(self, room: int, timeout: float) -> None:
        """A request for `room` may wait up to `timeout` s for its offer (not `room_wait_s`)."""
        now = asyncio.get_running_loop().time()
        self._expected[room] = now + timeout
        if len(self._expected) > self._expected_prune_at:  # rooms whose prefill failed unoffered
            self._expected = {r: t for r, t in self._expected.items() if t > now}
            self._expected_prune_at = max(1024, 2 * len(self._expected))
        if self._waiters.get(room):  # wake the waiting requests: they tell their decode the new bound
            arrival = self._arrival(room)
            arrival.set()
            arrival.clear()

    def requested(self, room: int) -> bool:
        """Whether a decode's request for `room` has arrived (waiting for the offer, or taken)."""
        offer = self._offers.get(room)
        return bool(offer is not None and offer.claimed) or self._waiters.get(room, 0) > 0

    def abort(self, room: int, error: PdmeshError | None = None) -> bool:
        """Fail room `room`'s offer (its decode sees the error); False if none is held."""
        offer = self._offers.get(room)
        if offer is None:
            return False
        return offer.status.fail(error or Cancelled(f"the prefill rank aborted room {room}",
                                                  reason=Reason.KV_TRANSFER_ABORTED,
                                                  metadata={"bootstrap_room": room}))

    async def close(self) -> None:
        for room in list(self._offers):
            self.abort(room, Cancelled("KV sender closing", reason=Reason.KV_TRANSPORT_CLOSED))
        if self._owns_transport:
            await self.transport.close()
        if self._tasks:  # they wind down on their own once their links are closed or aborted
            await asyncio.wait(list(self._tasks), timeout=2 * self.config.abort_grace_s)
        for task in list(self._tasks):
            task.cancel()
        self._executor.shutdown(wait=True)
        self._samehost.close()

    # -- control messages ---------------------------------------------------------------------

    def _accept(self, link: Link) -> None:
        link.on_control = lambda data, link=link: self._on_control(link, data)
        link.on_closed = lambda err, link=link: self._link_closed(link, err)

    def _on_control(self, link: Link, data: bytes) -> None:
        try:
            message = wire.decode(data)
        except PdmeshError as err:
            log.warning("bad control message from %s: %s", link.peer, err)
            return
        kind = message.WhichOneof("body")
        if kind == "request":
            key = (id(link), message.request.transfer_id)
            if key in self._jobs:  # the running job keeps its id (and stays abortable)
                self._spawn(self._refuse_duplicate(link, message.request.transfer_id))
                return
            aborted = asyncio.get_running_loop().create_future()
            self._jobs[key] = aborted
            self._spawn(self._serve(link, message.request, aborted))
        elif kind == "abort":
            aborted = self._jobs.get((id(link), message.abort.transfer_id))
            if aborted is not None and not aborted.done():
                aborted.set_result(wire.failure_from_proto(message.abort.status))
        elif kind == "same_host_hello":
            self._spawn(self._answer_hello(link, message.same_host_hello))

    async def _answer_hello(self, link: Link, hello: pb.SameHostHello) -> None:
        device = torch.device("cpu") if hello.kind == "cpu" else self._device or (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None)
        if self._device is not None and device is not None and device.type != self._device.type:
            device = None  # a CPU pool cannot write a CUDA one (or back): UCX

        ready = await self._samehost.on_hello(link, hello, device, self._executor)
        try:
            await link.send_control(wire.encode(pb.TransferMessage(same_host_ready=ready)))
        except PdmeshError as err:
            log.info("same-host answer to %s: %s", link.peer, err)

    def _link_closed(self, link: Link, error: PdmeshError) -> None:
        self._samehost.link_closed(link)  # unmapped once no copy uses it
        for (link_id, _), aborted in list(self._jobs.items()):
            if link_id == id(link) and not aborted.done():
                aborted.set_result(error)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(_task_done)
        task.add_done_callback(self._tasks.discard)

    # -- one request --------------------------------------------------------------------------

    async def _serve(self, link: Link, request: pb.TransferRequest,
                     aborted: asyncio.Future) -> None:
        key = (id(link), request.transfer_id)
        try:
            try:
                offer, direct = await self._claim(link, request, aborted)
            except PdmeshError as err:
                await self._respond(link, request.transfer_id, err)
                return
            # same host: no wire, so no plan and no runs to send
            plan, mine = self._plan(request, offer) if direct is None else (None, None)
            # posted, not awaited: the copy or the sends start while the OK leaves (ordered
            # before the trailer); a send that fails breaks the link, which fails the transfer
            link.post_control(_response(request.transfer_id, None, mine)).add_done_callback(
                functools.partial(_close_if_failed, link))
            offer.status.advance(TransferState.TRANSFERRING)
            aborted.add_done_callback(lambda f, o=offer: o.status.fail(f.result()))
            try:
                if direct is not None:  # same host: straight into the decode's pages
                    await samehost.write(link, request, offer, *direct, self._samehost,
                                         self._executor, self.config.same_host_copy_threads)
                else:
                    await self._stream(link, request, offer, plan, aborted)
            finally:
                self._retire(offer)
                offer._finish()
        except PdmeshError as err:  # the link broke while answering
            log.info("transfer %x to %s: %s", request.transfer_id, link.peer, err)
        finally:
            self._jobs.pop(key, None)

    async def _refuse_duplicate(self, link: Link, transfer_id: int) -> None:
        try:
            await self._respond(link, transfer_id, AlreadyExists(
                f"transfer id {transfer_id:#x} is already in use on this link; draw a fresh "
                "random id per request", reason=Reason.KV_TRANSFER_ID_IN_USE))
        except PdmeshError as err:  # the link broke while answering
            log.info("transfer %x to %s: %s", transfer_id, link.peer, err)

    async def _respond(self, link: Link, transfer_id: int, error: PdmeshError | None,
                       page_runs: list[int] | None = None) -> None:
        await link.send_control(_response(transfer_id, error, page_runs))

    async def _claim(self, link: Link, request: pb.TransferRequest, aborted: asyncio.Future):
        """The offer this request may take, after every check, and its same-host target (or
        None); raises the status to answer."""
        layout = _check_request(request)
        self._check_epoch(request)  # before any wait: a stale decode must re-resolve at once
        offer = await self._wait_for_offer(link, request, aborted)
        if not hmac.compare_digest(request.token, offer.token):
            raise Unauthenticated(f"wrong transfer token for room {request.room}; only the "
                                  "decode the router paired with this prefill may take it",
                                  reason=Reason.KV_TRANSFER_TOKEN_MISMATCH,
                                  metadata={"bootstrap_room": request.room})
        if offer.claimed:
            raise FailedPrecondition(f"room {request.room} is already being sent",
                                     reason=Reason.KV_TRANSFER_ALREADY_CLAIMED,
                                     metadata={"bootstrap_room": request.room})
        try:
            self._check_fit(request, layout, offer)
        except PdmeshError as err:
            offer.status.fail(err)
            raise
        direct = None
        if request.HasField("same_host"):  # a bad target fails the request, not the offer
            direct = self._samehost.target(link, request, layout, offer.pool.kv.device)
        offer.claimed = True
        return offer, direct

    def _check_epoch(self, request: pb.TransferRequest) -> None:
        # An instance's epoch grows whenever one of its ranks (re)starts; a decode whose info is
        # older than this rank's own start resolved a process that is gone (or an older policy).
        if request.epoch < self.epoch:
            raise EpochMismatch(f"decode resolved this prefill at epoch {request.epoch}, this rank "
                                f"started at epoch {self.epoch}; refresh the instance info and retry",
                                metadata={"requested": request.epoch, "actual": self.epoch,
                                          "bootstrap_room": request.room})

    def _check_fit(self, request: pb.TransferRequest, layout: KvLayout, offer: Offer) -> None:
        offer.pool.layout.check_compatible(layout)
        have = offer.pool.layout.request_bytes(len(offer.page_ids))
        if request.num_pages != len(offer.page_ids) or request.expected_bytes != have:
            raise FailedPrecondition(
                f"room {request.room} holds {len(offer.page_ids)} pages ({have} bytes), the decode "
                f"expects {request.num_pages} pages ({request.expected_bytes} bytes)",
                reason=Reason.KV_SIZE_MISMATCH,
                metadata={"pages": len(offer.page_ids), "requested_pages": request.num_pages})

    async def _wait_for_offer(self, link: Link, request: pb.TransferRequest,
                              aborted: asyncio.Future) -> Offer:
        room = request.room
        self._waiters[room] = self._waiters.get(room, 0) + 1
        try:
            return await self._wait_for_offer_once(link, request, aborted)
        finally:  # a request for a room never offered leaves nothing behind
            left = self._waiters.pop(room) - 1
            if left:
                self._waiters[room] = left
            elif room not in self._offers:
                self._arrivals.pop(room, None)

    async def _wait_for_offer_once(self, link: Link, request: pb.TransferRequest,
                                   aborted: asyncio.Future) -> Offer:
        loop = asyncio.get_running_loop()
        room, announced = request.room, None
        start_until = loop.time() + self.config.room_wait_s
        while True:
            offer = self._offers.get(room)
            if offer is not None and not offer.status.terminal:
                return offer
            if aborted.done():
                raise Cancelled("the decode aborted the transfer before it started",
                                reason=Reason.KV_TRANSFER_CANCELLED)
            until = max(start_until, self._expected.get(room, 0.0))
            if until != announced:  # the decode bounds its wait for our answer by this
                announced = until
                waiting = pb.TransferWaiting(transfer_id=request.transfer_id,
                                             wait_ms=max(0, int((until - loop.time()) * 1e3)))
                await link.send_control(wire.encode(pb.TransferMessage(waiting=waiting)))
            left = until - loop.time()
            if left <= 0:
                raise NotFound(f"room {room} is not held by this prefill rank (waited "
                               f"{self.config.room_wait_s:.1f} s); the decode asked the wrong "
                               "rank, or the prefill failed or has not started it",
                               reason=Reason.KV_ROOM_NOT_FOUND, metadata={"bootstrap_room": room})
            arrival = self._arrival(room)
            waiter = asyncio.ensure_future(arrival.wait())
            await asyncio.wait({waiter, aborted}, timeout=left,
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    def _arrival(self, room: int) -> asyncio.Event:
        event = self._arrivals.get(room)
        if event is None:
            event = self._arrivals[room] = asyncio.Event()
        return event

    def _offer_failed(self, offer: Offer) -> None:
        if not offer.claimed:  # else the streaming task finishes it once UCX is done
            self._retire(offer)
            offer._finish()

    def _retire(self, offer: Offer) -> None:
        if self._offers.get(offer.room) is offer:
            del self._offers[offer.room]
        self._arrivals.pop(offer.room, None)
        self._expected.pop(offer.room, None)

    # -- streaming ----------------------------------------------------------------------------

    def _plan(self, request: pb.TransferRequest, offer: Offer) -> tuple[runs.WirePlan, list[int]]:
        """The wire plan of this request (runs.py) and this side's runs, as the OK carries them."""
        mine = offer.page_runs
        plan = runs.WirePlan.build(
            offer.pool.layout, len(offer.page_ids), request.layers_per_chunk,
            runs.checked_runs(request.page_runs, request.num_pages, from_request=True), mine,
            min_direct_bytes=request.direct_min_bytes, max_direct_runs=request.max_direct_runs)
        return plan, runs.on_wire(mine, len(offer.page_ids))

    async def _stream(self, link: Link, request: pb.TransferRequest, offer: Offer,
                      plan: runs.WirePlan, aborted: asyncio.Future) -> None:
        out = Outgoing(link, request.transfer_id, plan, PoolSide(plan, offer.pool.kv, offer.page_ids),
                       self._staging_for(offer.pool), offer.status, self.config,
                       pack=lambda *args: _pack_chunk(*args))  # late lookup: tests hook it
        status = offer.status
        try:
            for c in range(len(plan.chunks)):
                if status.terminal:
                    break
                # layer streaming: chunk c's layers are final; nothing reads a later chunk's
                # pages ahead of time until the prefill's compute ended
                await status.guard(offer.wait_layers(plan.ranges[c][1]))
                out.prepare_ahead(c, self._executor, until=None if offer.layers.done else c + 1)
                if not await out.send_chunk(c):
                    break
            await out.settle()
            if not status.terminal:
                value = await out.checksum()
                await wire.send_trailer(link, status, request.transfer_id, offer, out.total, value)
                return
        except PdmeshError as err:
            status.fail(err)
        except Exception as err:  # noqa: BLE001 - a bug fails the transfer typed, now
            status.fail(wire.unexpected(err, f"the KV sender of room {request.room}"))
        await self._wind_down(link, request.transfer_id, out, status, aborted)

    async def _wind_down(self, link: Link, tid: int, out: Outgoing, status: TransferStatus,
                         aborted: asyncio.Future) -> None:
        """After a failure: tell the receiver (unless it told us), complete the remaining message
        tags with empty messages, and wait until UCX and the pack threads are done with every
        buffer and page."""
        if not aborted.done() and not link.closed:
            abort = pb.TransferAbort(transfer_id=tid, status=wire.failure_to_proto(status.error))
            try:
                await link.send_control(wire.encode(pb.TransferMessage(abort=abort)))
            except PdmeshError:
                pass
        for index in range(out.sent, out.plan.num_messages):
            out.inflight.append((link.send_data(_EMPTY, wire.chunk_tag(tid, index)), None, 0))
        jobs = [job for job, _ in out.jobs.values()]
        if jobs:  # pack threads still write into their buffers
            await asyncio.wait(jobs)
            for job in jobs:  # their failures are the transfer's, already reported
                job.cancelled() or job.exception()
        futures = [f for f, _, _ in out.inflight]
        if await drain(futures, link, self.config.abort_grace_s):
            for _, buf, _ in out.inflight:
                if buf is not None:
                    out.staging.give(buf)
            for _, buf in out.jobs.values():
                if buf is not None:
                    out.staging.give(buf)

    def _staging_for(self, pool: KvPool) -> StagingCache:
        if self._staging is None or self._staging.device != pool.kv.device:
            self._staging = StagingCache(self.config.staging_cache_bytes, pool.kv.device)
        return self._staging


def _check_request(request: pb.TransferRequest) -> KvLayout:
    """The checks a request must pass whatever the sender holds: answered at once, before any
    wait for the room (a malformed request never holds a task for `room_wait_s`)."""
    validate_room(request.room)
    layout = KvLayout.from_proto(request.layout)
    if not 1 <= request.layers_per_chunk <= layout.num_layers:
        raise InvalidArgument(f"layers_per_chunk {request.layers_per_chunk} is outside "
                              f"1..{layout.num_layers}", reason=Reason.INVALID_CHUNKING)
    if not request.token:
        raise InvalidArgument("the transfer request carries no token", reason=Reason.INVALID_TRANSFER_TOKEN)
    runs.checked_runs(request.page_runs, request.num_pages, from_request=True)
    return layout


def _response(transfer_id: int, error: PdmeshError | None, page_runs: list[int] | None = None
              ) -> bytes:
    """The encoded answer to a transfer request: OK (with the sender's page runs) or `error`."""
    response = pb.TransferResponse(transfer_id=transfer_id, page_runs=page_runs or [])
    if error is not None:
        response.status.CopyFrom(wire.failure_to_proto(error))
    return wire.encode(pb.TransferMessage(response=response))


def _close_if_failed(link: Link, sent: asyncio.Future) -> None:
    """A control message that could not be sent: the link is broken, close it (which fails
    every transfer on it)."""
    if sent.cancelled() or sent.exception() is None:
        return
    err = sent.exception()
    link.close(err if isinstance(err, PdmeshError) else Unavailable(
        f"sending to {link.peer} failed: {err!r}", reason=Reason.KV_TRANSFER_PEER_LOST))


def _task_done(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("KV sender task failed", exc_info=task.exception())


def _pack_chunk(kv: torch.Tensor, ids: torch.Tensor, a: int, b: int, buf: torch.Tensor
                ) -> torch.Tensor:
    """Worker thread: pack layers [a, b) of pages `ids` into `buf`; return its checksum parts
    (digest.py). On a GPU, returns once the packed bytes are there (an event, not a device-wide
    sync): UCX reads them from another stream."""
    sums = digest.pack_parts(kv, ids, a, b, buf)  # the checksum in the pack's pass where it can
    if kv.is_cuda:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(kv.device))
        done.synchronize()
    return sums
