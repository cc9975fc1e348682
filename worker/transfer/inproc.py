"""The in-process transport: the `link.Transport` contract with asyncio and memory copies only.

Addresses are `inproc://<name>` and resolve within the process (any event loop thread that
created them; use one loop). Data semantics follow UCX tag matching: a send waits until a
receive with its tag is posted on the other side (like a rendezvous), a message may be shorter
than the receive buffer, a longer one fails the receive (truncated); closing either end fails
every pending send and receive on both ends with UNAVAILABLE. `kill()` breaks every link at once,
the way a process that dies does.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict, deque
from collections.abc import Callable

import torch

from pdmesh.errors import DataLoss, PdmeshError, Unavailable
from pdmesh.reasons import Reason
from pdmesh.worker.transfer.link import Link, Transport

_LISTENERS: dict[str, "InprocTransport"] = {}
_NAMES = itertools.count(1)


class InprocLink(Link):
    def __init__(self, peer: str) -> None:
        super().__init__(peer)
        self._other: InprocLink | None = None
        self._loop = asyncio.get_running_loop()
        self._posted: dict[int, deque] = defaultdict(deque)  # tag -> (buf, recv future)
        self._unexpected: dict[int, deque] = defaultdict(deque)  # tag -> (buf, peer's send future)

    async def send_control(self, data: bytes) -> None:
        if self.closed_error is not None:
            raise self.closed_error
        self._loop.call_soon(self._other._deliver, bytes(data))

    def _deliver(self, data: bytes) -> None:
        self._dispatch(data)

    def send_data(self, buf: torch.Tensor, tag: int) -> asyncio.Future:
        future = self._loop.create_future()
        if self.closed_error is not None:
            future.set_exception(self.closed_error)
        else:
            self._other._arrive(buf, tag, future)
        return future

    def recv_data(self, buf: torch.Tensor, tag: int) -> asyncio.Future:
        future = self._loop.create_future()
        if self.closed_error is not None:
            future.set_exception(self.closed_error)
        elif self._unexpected[tag]:
            sent, send_future = self._unexpected[tag].popleft()
            _match(sent, send_future, buf, future)
        else:
            self._posted[tag].append((buf, future))
        return future

    def _arrive(self, buf: torch.Tensor, tag: int, send_future: asyncio.Future) -> None:
        if self._posted[tag]:
            into, recv_future = self._posted[tag].popleft()
            _match(buf, send_future, into, recv_future)
        else:
            self._unexpected[tag].append((buf, send_future))

    def close(self, error: PdmeshError) -> None:
        other = self._other
        self._break(error)
        if other is not None:
            other._break(Unavailable(f"peer {self.peer} closed the link: {error.message}",
                                     reason=Reason.KV_TRANSFER_PEER_LOST))

    def _break(self, error: PdmeshError) -> None:
        if self.closed_error is not None:
            return
        for queues in (self._posted, self._unexpected):
            for queue in queues.values():
                for _, future in queue:
                    if not future.done():
                        future.set_exception(Unavailable(
                            f"link to {self.peer} closed: {error.message}",
                            reason=Reason.KV_TRANSFER_PEER_LOST))
            queues.clear()
        self._closed(error)


def _match(sent: torch.Tensor, send_future: asyncio.Future, into: torch.Tensor,
           recv_future: asyncio.Future) -> None:
    n = sent.numel()
    if n > into.numel():
        recv_future.set_exception(DataLoss(f"message of {n} bytes truncated to {into.numel()}",
                                           reason=Reason.KV_TRANSFER_TRUNCATED))
    else:
        if n:
            into[:n].copy_(sent)
        recv_future.set_result(None)
    send_future.set_result(None)


class InprocTransport(Transport):
    scheme = "inproc"

    def __init__(self) -> None:
        self._name: str | None = None
        self._on_link: Callable[[Link], None] | None = None
        self._links: list[InprocLink] = []

    async def listen(self, on_link: Callable[[Link], None], host: str = "local", port: int = 0
                     ) -> str:
        self._name = f"{host}-{next(_NAMES)}"
        self._on_link = on_link
        _LISTENERS[self._name] = self
        return f"inproc://{self._name}"

    async def connect(self, address: str, timeout: float) -> Link:
        name = address.removeprefix("inproc://")
        server = _LISTENERS.get(name) if address.startswith("inproc://") else None
        if server is None or server._on_link is None:
            raise Unavailable(f"no in-process KV listener at {address}",
                              reason=Reason.KV_TRANSFER_PEER_UNREACHABLE, metadata={"address": address})
        mine, theirs = InprocLink(address), InprocLink(f"inproc-client-{next(_NAMES)}")
        mine._other, theirs._other = theirs, mine
        self._links.append(mine)
        server._links.append(theirs)
        server._on_link(theirs)
        return mine

    def kill(self) -> None:
        """Break every link as a dying process would (peers see UNAVAILABLE)."""
        if self._name is not None:
            _LISTENERS.pop(self._name, None)
        for link in self._links:
            link.close(Unavailable("in-process peer killed", reason=Reason.KV_TRANSFER_PEER_LOST))
        self._links.clear()

    async def close(self) -> None:
        self.kill()
        self._on_link = None
