"""The UCX transport: ucxx's UCX worker, progressed by pdmesh's own engine on the event loop.

Addresses are `ucx://HOST:PORT` (a UCX listener). Control messages travel on the endpoint's UCX
stream, framed (8-byte header: magic, length; then the protobuf) and read by one reader task per
link; KV chunks travel as tagged messages straight into the receiver's staging buffers (tags are
unique per transfer: a random 64-bit transfer id and the chunk index).

Why streams and not active messages (as before issue 11): ucxx files arriving active messages by
the endpoint's UCX handle, and a new endpoint that gets a closed one's handle back found a stale
entry there ("a message is waiting" on an empty queue): the first message on such a re-created
link was never read. Stream bytes belong to the endpoint itself, stay buffered by UCX until a
receive is posted, and keep their order, so nothing is lost on a link that has just opened or
whose handle was recycled; `Link` holds messages that arrive before the owner set its handler. Endpoints have
peer-error handling: when the peer dies UCX reports it on the endpoint (TCP reset, or the closed
connection-manager socket on shared memory), ucxx cancels the endpoint's requests, and the link
closes with UNAVAILABLE.

Why not ucxx's async `Endpoint` API: there, awaiting a request is `while not done: await
asyncio.sleep(0)` (unless a progress thread and a notifier thread run), and its blocking mode
never re-arms the worker, so a rank with one pending receive (a control reader) spins a core
forever; on 2 cores that took pdmesh from 1.2 to 0.15 GB/s over tcp. This engine posts requests
with ucxx's Cython layer (`ucxx._lib.libucxx`) and completes asyncio futures itself:

- UCX's epoll fd is an asyncio reader. On an event: progress the worker, complete finished
  requests, deliver queued active messages, then re-arm (progress again while arm says busy).
  An idle rank sleeps in epoll and costs no CPU.
- `hot_poll` (off by default; PDMESH_UCX_HOT_POLL=1 turns it on, =cuda only while a request on
  CUDA memory is in flight): while such requests are in flight the engine progresses on every
  event-loop turn instead of waiting for wake-ups; with none it goes back to epoll. On 2 shared
  cores polling took the CPU that packing, unpacking and the kernel's copies need (0.3 against
  0.6-2.2 GB/s under load, README); a rank with cores of its own may gain from it (on the GPU,
  a busy-polled probe reached ucx_perftest's rate: README, "CUDA memory over UCX").
- A 0.25 s timer progresses too, as a safety net (and drives UCX keepalive).

`config.apply_ucx_defaults()` runs before ucxx is imported, so its settings are in force unless
the environment already set them.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import weakref
from collections.abc import Callable

import torch

from pdmesh.config import env, env_bool
from pdmesh.errors import Cancelled, DataLoss, DeadlineExceeded, PdmeshError, Unavailable
from pdmesh.reasons import Reason
from pdmesh.worker.transfer.config import apply_ucx_defaults
from pdmesh.worker.transfer.link import Link, Transport

log = logging.getLogger(__name__)
_HELLO = b"pdmeshKV"  # the stream handshake of every new link (see UcxLink._handshake)
_HANDSHAKE_S = 10.0
_READERS_END_S = 5.0  # how long closing a transport waits for its links' readers to end
_FRAME = struct.Struct("<II")  # control frame header: magic, payload length
_FRAME_MAGIC = 0x7064_4B56  # "pdKV"
_MAX_CONTROL_BYTES = 64 << 20
_CONTEXT = None
_ENGINES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Engine]" = \
    weakref.WeakKeyDictionary()


def _api():
    apply_ucx_defaults()
    import ucxx  # noqa: F401 - loads libucx and sets ucxx's own defaults
    from ucxx._lib import libucxx

    return libucxx


def engine() -> "_Engine":
    """The engine of the running event loop (one UCX worker per loop, one context per process)."""
    global _CONTEXT
    loop = asyncio.get_running_loop()
    found = _ENGINES.get(loop)
    if found is None:
        api = _api()
        if _CONTEXT is None:
            _CONTEXT = api.UCXContext({})
        found = _ENGINES[loop] = _Engine(api, _CONTEXT, loop)
    return found


class _Engine:
    def __init__(self, api, context, loop: asyncio.AbstractEventLoop) -> None:
        from ucxx._lib.arr import Array
        from ucxx.types import Tag, TagMaskFull

        self.api, self.loop = api, loop
        self.Array, self.Tag, self.TagMaskFull = Array, Tag, TagMaskFull
        self.worker = api.UCXWorker(context)
        self.worker.init_blocking_progress_mode()
        self.hot_poll = hot_poll_mode()
        self._pending: dict = {}  # UCXRequest -> (future, buffer kept alive, peer)
        self._cuda_pending = 0  # of them, requests on CUDA memory
        self._scheduled = False
        loop.add_reader(self.worker.epoll_file_descriptor, self.progress)
        self._tick()

    def _tick(self) -> None:
        self.progress()
        self.loop.call_later(0.25, self._tick)

    def submit(self, request, keep=None, peer: str = "peer") -> asyncio.Future:
        future = self.loop.create_future()
        if request.completed:  # done as posted (a small send, a receive of bytes already here)
            self._settle(request, future, peer)
            return future
        self._pending[request] = (future, keep, peer)
        self._cuda_pending += _is_cuda(keep)
        self._soon()
        return future

    def _soon(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._scheduled_progress)

    def _scheduled_progress(self) -> None:
        self._scheduled = False
        self.progress()

    def progress(self) -> None:
        worker = self.worker
        worker.progress()
        self._reap()
        if self._pending and (self.hot_poll == "all" or (self.hot_poll == "cuda" and self._cuda_pending)):
            self._soon()  # keep progressing every loop turn while such requests are in flight
            return
        while not worker.arm():  # events pending: progress until UCX can sleep on epoll
            worker.progress()
            self._reap()

    def _reap(self) -> None:
        done = [r for r in self._pending if r.completed]
        for request in done:
            future, keep, peer = self._pending.pop(request)
            self._cuda_pending -= _is_cuda(keep)
            if not future.done():
                self._settle(request, future, peer)

    @staticmethod
    def _settle(request, future: asyncio.Future, peer: str) -> None:
        try:
            request.check_error()
        except Exception as err:  # noqa: BLE001 - mapped to the typed error
            future.set_exception(_lost(peer, err))
            # marked as seen at once (a done-callback never runs once the loop closed): a
            # request whose awaiter went away (a handshake cut by its timeout, a reader at
            # exit) may fail as its link closes, which is no error to report; awaiters still
            # get it
            future.exception()
        else:
            future.set_result(request)


def hot_poll_mode() -> str:
    """PDMESH_UCX_HOT_POLL: "off" (the default: sleep in epoll between UCX events), "all" (1/on:
    progress every event-loop turn while any request is in flight) or "cuda" (only while a
    request on CUDA memory is)."""
    value = (env("UCX_HOT_POLL") or "").strip().lower()
    if value in ("all", "cuda"):
        return value
    return "all" if env_bool("UCX_HOT_POLL") else "off"


def _is_cuda(buf) -> bool:
    return isinstance(buf, torch.Tensor) and buf.is_cuda


def _lost(peer: str, err: BaseException) -> PdmeshError:
    from ucxx import exceptions as ux

    if isinstance(err, ux.UCXMessageTruncatedError):
        return DataLoss(f"message from {peer} longer than its receive buffer: {err}",
                        reason=Reason.KV_TRANSFER_TRUNCATED)
    if isinstance(err, ux.UCXCanceledError):
        return Unavailable(f"UCX cancelled a request on the link to {peer} (link closed)",
                           reason=Reason.KV_TRANSFER_PEER_LOST, metadata={"peer": peer})
    return Unavailable(f"UCX link to {peer} failed: {type(err).__name__}: {err}",
                       reason=Reason.KV_TRANSFER_PEER_LOST, metadata={"peer": peer})


class UcxLink(Link):
    def __init__(self, engine_: _Engine, ep, peer: str, transport: "UcxTransport") -> None:
        super().__init__(peer)
        self._engine, self._ep, self._transport = engine_, ep, transport
        self._reader: asyncio.Task | None = None
        ep.set_close_callback(self._ucx_closed)

    async def _handshake(self, listener: bool) -> None:
        """Exchange 8 bytes over the UCX stream, listener first (as ucxx does), then start reading
        control frames. After this exchange both endpoints are wired up: nothing sent later is
        replayed by UCX (with protocol v1 a message replayed onto shared memory crashed UCX)."""
        import numpy as np

        mine, theirs = np.frombuffer(_HELLO, dtype=np.uint8), np.zeros(len(_HELLO), np.uint8)
        steps = [(self._ep.stream_send, mine), (self._ep.stream_recv, theirs)]
        for method, buf in (steps if listener else steps[::-1]):
            await self._submit(lambda m=method, b=buf: m(self._engine.Array(b)), buf)
        if bytes(theirs) != _HELLO:
            raise Unavailable(f"{self.peer} is not a pdmesh KV transfer endpoint",
                              reason=Reason.KV_TRANSFER_PEER_UNREACHABLE)
        if self._ep is not None and self._reader is None:
            self._reader = asyncio.ensure_future(self._read_control())

    async def _read_control(self) -> None:
        """Read framed control messages off the stream until the link closes."""
        import numpy as np

        header = np.zeros(_FRAME.size, np.uint8)
        try:
            while self._ep is not None:
                await self._recv_stream(header)
                magic, length = _FRAME.unpack(header.tobytes())
                if magic != _FRAME_MAGIC or length > _MAX_CONTROL_BYTES:
                    raise Unavailable(f"{self.peer} sent a malformed control frame (magic "
                                      f"{magic:#x}, length {length})",
                                      reason=Reason.KV_TRANSFER_BAD_FRAME)
                body = np.empty(length, np.uint8)
                if length:
                    await self._recv_stream(body)
                self._dispatch(body.tobytes())
        except PdmeshError as err:
            self.close(err)
        except asyncio.CancelledError:
            pass

    async def _recv_stream(self, buf) -> None:
        ep = self._ep
        if ep is None:
            raise self.closed_error or Unavailable("link closed", reason=Reason.KV_TRANSFER_PEER_LOST)
        await self._submit(lambda: ep.stream_recv(self._engine.Array(buf)), buf)

    def _ucx_closed(self) -> None:
        # called from inside UCX progress: act on the next loop turn
        self._engine.loop.call_soon(self.close, Unavailable(
            f"UCX endpoint to {self.peer} reported an error (peer died or closed)",
            reason=Reason.KV_TRANSFER_PEER_LOST, metadata={"peer": self.peer}))

    async def send_control(self, data: bytes) -> None:
        await self.post_control(data)

    def post_control(self, data: bytes) -> asyncio.Future:
        """Posted on the stream at once (so in order with every later message)."""
        import numpy as np

        buf = np.frombuffer(_FRAME.pack(_FRAME_MAGIC, len(data)) + bytes(data), dtype=np.uint8)
        return self._submit(lambda: self._ep.stream_send(self._engine.Array(buf)), buf)

    def send_data(self, buf: torch.Tensor, tag: int) -> asyncio.Future:
        return self._start(lambda arr: self._ep.tag_send(arr, self._engine.Tag(tag)), buf)

    def recv_data(self, buf: torch.Tensor, tag: int) -> asyncio.Future:
        e = self._engine
        return self._start(lambda arr: self._ep.tag_recv(arr, e.Tag(tag), e.TagMaskFull), buf)

    def _start(self, post: Callable, buf: torch.Tensor) -> asyncio.Future:
        target = buf if buf.is_cuda else buf.numpy()
        return self._submit(lambda: post(self._engine.Array(target)), target)

    def _submit(self, post: Callable, keep) -> asyncio.Future:
        """The future of a UCX request `post()` makes; failed at once on a closed link or an
        endpoint that refuses the post (marked seen, as the engine's failures are: its
        awaiter, if any, still gets it)."""
        error = self.closed_error
        if error is None:
            try:
                request = post()
            except Exception as err:  # noqa: BLE001 - the endpoint already broke
                error = _lost(self.peer, err)
            else:
                return self._engine.submit(request, keep, self.peer)
        future = self._engine.loop.create_future()
        future.set_exception(error)
        future.exception()
        return future

    def close(self, error: PdmeshError) -> None:
        if self.closed_error is not None:
            return
        ep, self._ep = self._ep, None
        if ep is not None:
            try:
                ep.remove_close_callback()
                ep.close_blocking(10**9, 1)  # cancels the endpoint's in-flight requests
            except Exception:  # noqa: BLE001
                log.debug("closing UCX endpoint to %s", self.peer, exc_info=True)
            self._engine._soon()  # reap the cancelled requests
        self._transport._links.discard(self)
        self._closed(error)


class UcxTransport(Transport):
    scheme = "ucx"

    def __init__(self) -> None:
        _api()
        self._listener = None
        self._links: set[UcxLink] = set()

    async def listen(self, on_link: Callable[[Link], None], host: str, port: int = 0) -> str:
        eng = engine()

        def accept(conn_request) -> None:
            eng.loop.call_soon(self._accept, eng, conn_request, on_link)

        self._listener = eng.api.UCXListener.create(eng.worker, port, accept)
        return f"ucx://{host}:{self._listener.port}"

    def _accept(self, eng: _Engine, conn_request, on_link) -> None:
        if self._listener is None:
            return
        try:
            ep = self._listener.create_endpoint_from_conn_request(conn_request, True)
        except Exception:  # noqa: BLE001 - the client went away before we accepted
            log.info("dropping a UCX connection request", exc_info=True)
            return
        link = UcxLink(eng, ep, "ucx-client", self)
        self._links.add(link)
        task = asyncio.ensure_future(self._greet(link, on_link))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _greet(self, link: "UcxLink", on_link) -> None:
        try:
            await asyncio.wait_for(link._handshake(listener=True), _HANDSHAKE_S)
        except (PdmeshError, asyncio.TimeoutError) as err:
            log.info("UCX client went away during the handshake: %s", err)
            link.close(Unavailable("handshake failed", reason=Reason.KV_TRANSFER_PEER_LOST))
            return
        on_link(link)

    async def connect(self, address: str, timeout: float) -> Link:
        if not address.startswith("ucx://") or ":" not in address[6:]:
            raise Unavailable(f"not a UCX address: {address!r} (want ucx://HOST:PORT)",
                              reason=Reason.KV_TRANSFER_PEER_UNREACHABLE, metadata={"address": address})
        host, _, port = address[6:].rpartition(":")
        eng = engine()
        try:
            ep = eng.api.UCXEndpoint.create(eng.worker, host, int(port), True)
        except Exception as err:  # noqa: BLE001
            raise Unavailable(f"cannot connect to the KV sender at {address}: {err}",
                              reason=Reason.KV_TRANSFER_PEER_UNREACHABLE,
                              metadata={"address": address}) from None
        link = UcxLink(eng, ep, address, self)
        self._links.add(link)
        try:
            await asyncio.wait_for(link._handshake(listener=False), timeout)
        except asyncio.TimeoutError:
            link.close(Unavailable("handshake timed out", reason=Reason.KV_TRANSFER_PEER_UNREACHABLE))
            raise DeadlineExceeded(f"connecting to the KV sender at {address} took over "
                                   f"{timeout:.1f} s", reason=Reason.KV_TRANSFER_CONNECT_TIMEOUT,
                                   metadata={"address": address}) from None
        except PdmeshError as err:
            link.close(err)
            raise Unavailable(f"cannot connect to the KV sender at {address}: {err.message}",
                              reason=Reason.KV_TRANSFER_PEER_UNREACHABLE,
                              metadata={"address": address}) from None
        return link

    async def close(self) -> None:
        """Close every link and the listener; return once the links' control readers have
        ended (their stream receives are cancelled with the endpoint), so that a loop closed
        next destroys no pending task."""
        readers = [link._reader for link in self._links
                   if link._reader not in (None, asyncio.current_task())]
        for link in list(self._links):
            link.close(Cancelled("transport closed", reason=Reason.KV_TRANSPORT_CLOSED))
        self._listener = None
        if readers:
            await asyncio.wait(readers, timeout=_READERS_END_S)
