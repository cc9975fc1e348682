"""The transport interface under the KV sender and receiver: listeners, links, tagged data.

A `Transport` is one rank's endpoint in the data plane (for UCX: its UCX worker). It `listen`s
(the sender's side; the address it returns is what the rank publishes) and `connect`s (the
receiver's side, one `Link` per peer, cached by the receiver). A `Link` is one connection:

- ordered control messages (`send_control(bytes)`; arriving ones go to `on_control`). A message
  that arrives before its owner installed `on_control` is held and handed over the moment the
  handler is set: a link never drops a control message for want of a handler (issue 11: on new
  links the first transfer requests used to vanish in that window),
- tagged data: `send_data(buf, tag)` / `recv_data(buf, tag)` return futures that finish when the
  transport is done with `buf` (a message matches the receive posted with the same tag on the
  other side, whenever either comes first; a message may be shorter than the receive buffer,
  and an empty one is how an aborted sender completes a posted receive),
- `on_closed(error)` once, when the link breaks (peer died, closed) or is closed locally; every
  data future not yet finished then fails with UNAVAILABLE (the transport has cancelled it).

Two backends: `ucx.UcxTransport` (ucxx, async API) and `inproc.InprocTransport` (asyncio only,
same semantics, for tests and single-process use). `make_transport(kind)` picks one lazily.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable

import torch

from pdmesh.errors import PdmeshError
from pdmesh.reasons import Reason

log = logging.getLogger(__name__)


class Link(abc.ABC):
    """One connection between two ranks."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self._on_control: Callable[[bytes], None] | None = None
        self._early: list[bytes] = []  # control messages that arrived before on_control was set
        #: Event-loop time of the last control message received (0: none yet).
        self.last_received = 0.0
        self.on_closed: Callable[[PdmeshError], None] = lambda error: None
        self.closed_error: PdmeshError | None = None

    @property
    def closed(self) -> bool:
        return self.closed_error is not None

    @property
    def on_control(self) -> Callable[[bytes], None] | None:
        return self._on_control

    @on_control.setter
    def on_control(self, handler: Callable[[bytes], None]) -> None:
        """Install the control handler; messages that arrived before it are handed over now."""
        self._on_control = handler
        early, self._early = self._early, []
        for data in early:
            self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        """Backends call this for every arriving control message, in order."""
        if self.closed_error is not None:
            return
        self.last_received = asyncio.get_running_loop().time()
        if self._on_control is None:
            self._early.append(data)
            return
        try:
            self._on_control(data)
        except Exception:
            log.exception("link to %s: control handler raised", self.peer)

    @abc.abstractmethod
    async def send_control(self, data: bytes) -> None:
        """Send one control message (ordered with the other control messages)."""

    def post_control(self, data: bytes) -> asyncio.Future:
        """Start sending one control message (ordered with the others) and return at once: for
        a caller that goes on without waiting for it to leave (a status before the copy, a
        request before its answer). The future's failure is marked seen: a failed send closes
        the link, or its caller watches the future."""
        future = asyncio.ensure_future(self.send_control(data))
        future.add_done_callback(_seen)
        return future

    @abc.abstractmethod
    def send_data(self, buf: torch.Tensor, tag: int) -> asyncio.Future:
        """Start sending `buf` (contiguous uint8) with `tag`; done when `buf` may be reused."""

    @abc.abstractmethod
    def recv_data(self, buf: torch.Tensor, tag: int) -> asyncio.Future:
        """Post a receive into `buf` for `tag`; done when the message has landed."""

    @abc.abstractmethod
    def close(self, error: PdmeshError) -> None:
        """Break the link now: cancel its pending data, tell `on_closed` (once)."""

    def _closed(self, error: PdmeshError) -> None:
        """Backends call this exactly when the link breaks."""
        if self.closed_error is not None:
            return
        self.closed_error = error
        try:
            self.on_closed(error)
        except Exception:
            log.exception("link to %s: on_closed raised", self.peer)


class Transport(abc.ABC):
    """One rank's place in the data plane."""

    scheme: str

    @abc.abstractmethod
    async def listen(self, on_link: Callable[[Link], None], host: str, port: int) -> str:
        """Accept links from peers; return the address peers connect to."""

    @abc.abstractmethod
    async def connect(self, address: str, timeout: float) -> Link:
        """Open a link to the listener at `address` (UNAVAILABLE / DEADLINE_EXCEEDED)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop listening and close every link."""


def make_transport(kind: str = "ucx") -> Transport:
    """The transport of this `kind` ("ucx" or "inproc"); UCX is imported only when chosen."""
    if kind == "ucx":
        from pdmesh.worker.transfer.ucx import UcxTransport

        return UcxTransport()
    if kind == "inproc":
        from pdmesh.worker.transfer.inproc import InprocTransport

        return InprocTransport()
    raise ValueError(f"unknown transport {kind!r}: use 'ucx' or 'inproc'")


def _seen(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def drain(futures: list[asyncio.Future], link: Link | None, grace_s: float) -> bool:
    """Wait until every future is done (the transport has finished with its buffer). If some
    are still pending after `grace_s`, close `link` (the transport then cancels them) and wait
    once more. True when all finished; False means buffers must never be reused."""
    pending = [f for f in futures if not f.done()]
    if pending:
        _, pending = await asyncio.wait(pending, timeout=grace_s)
    if pending and link is not None:
        log.warning("%d transfer requests to %s still pending %.1f s after failure: closing the "
                    "link", len(pending), link.peer, grace_s)
        from pdmesh.errors import Unavailable

        link.close(Unavailable(f"requests to {link.peer} did not finish within {grace_s:.1f} s "
                               "of an abort", reason=Reason.KV_TRANSFER_PEER_STUCK))
        _, pending = await asyncio.wait(pending, timeout=grace_s)
    for future in futures:
        if future.done() and not future.cancelled():
            future.exception()  # seen: the transfer reports its own error
    if pending:
        log.error("%d transfer requests to %s never finished; their buffers stay out of use",
                  len(pending), link.peer if link else "?")
    return not pending
