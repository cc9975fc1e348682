"""The UCX transport (ucxx, async API): one UCX worker per process, progressed by its event loop.

Addresses are `ucx://HOST:PORT` (a UCX listener). Control messages travel as UCX active messages
(ordered per endpoint, received into buffers ucxx sizes), KV chunks as tagged messages into the
receiver's own staging buffers (ucxx mixes each endpoint's private tag into ours, so two peers'
tags never meet). Endpoints are created with peer-error handling: when the peer dies, UCX
reports it on the endpoint (TCP reset, or keepalive on shared memory), ucxx cancels the
endpoint's requests, and the link closes with UNAVAILABLE.

`config.apply_ucx_defaults()` runs before the first `import ucxx`, so the settings it chooses
are in force unless the environment already set them.

`hot_poll`: while any transfer moves data, a task calls `worker.progress()` on every event-loop
turn instead of waiting for UCX's epoll wake-ups (see README's transfer benchmark for what it
buys); with nothing moving the loop sleeps in epoll as usual, so an idle rank costs no CPU.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import torch

from pdmesh.errors import Cancelled, DataLoss, DeadlineExceeded, PdmeshError, Unavailable
from pdmesh.worker.transfer.config import apply_ucx_defaults
from pdmesh.worker.transfer.link import Link, Transport

log = logging.getLogger(__name__)


def _ucxx():
    apply_ucx_defaults()
    import ucxx

    return ucxx


def _array(buf: torch.Tensor):
    """What ucxx accepts: a numpy view of a CPU tensor, the tensor itself on CUDA."""
    return buf if buf.is_cuda else buf.numpy()


def _lost(peer: str, err: BaseException) -> PdmeshError:
    ucxx = _ucxx()
    if isinstance(err, ucxx.exceptions.UCXMessageTruncatedError):
        return DataLoss(f"message from {peer} longer than its receive buffer: {err}",
                        reason="KV_TRANSFER_TRUNCATED")
    if isinstance(err, ucxx.exceptions.UCXCanceledError):
        return Unavailable(f"UCX cancelled a request on the link to {peer} (link closed)",
                           reason="KV_TRANSFER_PEER_LOST", metadata={"peer": peer})
    return Unavailable(f"UCX link to {peer} failed: {type(err).__name__}: {err}",
                       reason="KV_TRANSFER_PEER_LOST", metadata={"peer": peer})


class UcxLink(Link):
    def __init__(self, ep, peer: str, transport: "UcxTransport") -> None:
        super().__init__(peer)
        self._ep = ep
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        ep.set_close_callback(self._ucx_closed)
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                data = await self._ep.am_recv()
                self.on_control(bytes(data))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the endpoint broke or closed
            self.close(_lost(self.peer, err))

    def _ucx_closed(self) -> None:
        # ucxx calls this from UCX progress (our loop's thread in blocking mode; be safe anyway)
        try:
            self._loop.call_soon_threadsafe(
                self.close, Unavailable(f"UCX endpoint to {self.peer} reported an error "
                                        "(peer died or closed)", reason="KV_TRANSFER_PEER_LOST",
                                        metadata={"peer": self.peer}))
        except RuntimeError:  # loop closed at shutdown
            pass

    async def send_control(self, data: bytes) -> None:
        if self.closed_error is not None:
            raise self.closed_error
        import numpy as np

        try:
            await self._ep.am_send(np.frombuffer(data, dtype=np.uint8))
        except Exception as err:
            error = _lost(self.peer, err)
            self.close(error)
            raise error from None

    def send_data(self, buf: torch.Tensor, tag: int) -> asyncio.Future:
        return asyncio.ensure_future(self._op(self._ep.send, buf, tag))

    def recv_data(self, buf: torch.Tensor, tag: int) -> asyncio.Future:
        return asyncio.ensure_future(self._op(self._ep.recv, buf, tag))

    async def _op(self, method, buf: torch.Tensor, tag: int) -> None:
        if self.closed_error is not None:
            raise self.closed_error
        try:
            await method(_array(buf), tag=tag)
        except Exception as err:
            raise _lost(self.peer, err) from None

    def close(self, error: PdmeshError) -> None:
        if self.closed_error is not None:
            return
        self._reader.cancel()
        ep, self._ep = self._ep, None
        if ep is not None and ep._ep is not None:
            try:
                ep.abort()  # cancels this endpoint's in-flight requests; they fail UNAVAILABLE
            except Exception:
                log.debug("aborting UCX endpoint to %s", self.peer, exc_info=True)
        self._transport._links.discard(self)
        self._closed(error)


class UcxTransport(Transport):
    scheme = "ucx"

    def __init__(self, hot_poll: bool | None = None) -> None:
        self._ucxx = _ucxx()
        self._listener = None
        self._links: set[UcxLink] = set()
        if hot_poll is None:
            hot_poll = os.environ.get("PDMESH_UCX_HOT_POLL", "1") != "0"
        self._hot_poll = hot_poll
        self._active = 0
        self._poller: asyncio.Task | None = None

    async def listen(self, on_link: Callable[[Link], None], host: str, port: int = 0) -> str:
        def accept(ep) -> None:
            link = UcxLink(ep, "ucx-client", self)
            self._links.add(link)
            on_link(link)

        self._listener = self._ucxx.create_listener(accept, port=port,
                                                    endpoint_error_handling=True)
        return f"ucx://{host}:{self._listener.port}"

    async def connect(self, address: str, timeout: float) -> Link:
        if not address.startswith("ucx://") or ":" not in address[6:]:
            raise Unavailable(f"not a UCX address: {address!r} (want ucx://HOST:PORT)",
                              reason="KV_TRANSFER_PEER_UNREACHABLE", metadata={"address": address})
        host, _, port = address[6:].rpartition(":")
        try:
            ep = await asyncio.wait_for(self._ucxx.create_endpoint(
                host, int(port), endpoint_error_handling=True, connect_timeout=timeout), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"connecting to the KV sender at {address} took over "
                                   f"{timeout:.1f} s", reason="KV_TRANSFER_CONNECT_TIMEOUT",
                                   metadata={"address": address}) from None
        except Exception as err:
            raise Unavailable(f"cannot connect to the KV sender at {address}: {err}",
                              reason="KV_TRANSFER_PEER_UNREACHABLE",
                              metadata={"address": address}) from None
        link = UcxLink(ep, address, self)
        self._links.add(link)
        return link

    def transfers_started(self) -> None:
        self._active += 1
        if self._hot_poll and self._poller is None:
            self._poller = asyncio.ensure_future(self._poll())

    def transfers_finished(self) -> None:
        self._active -= 1

    async def _poll(self) -> None:
        worker = self._ucxx.core._get_ctx().worker
        try:
            while self._active > 0:
                worker.progress()
                await asyncio.sleep(0)
        finally:
            self._poller = None

    async def close(self) -> None:
        for link in list(self._links):
            link.close(Cancelled("transport closed", reason="KV_TRANSPORT_CLOSED"))
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._poller is not None:
            self._poller.cancel()
