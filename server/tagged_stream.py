"""One shared bidirectional stream to a bootstrap service: what the lookup and registration
clients have in common (`watcher.RoomWatcher`, `registrar.RoomRegistrar`).

A process keeps ONE such stream per bootstrap address and per kind, shared by every caller:

- callers queue their requests and `_kick()` the writer task, which drains the queue while the
  previous write is in flight, so whatever queued meanwhile goes out in one message;
- the stream is opened with wait_for_ready and proven with a handshake (an empty tagged message)
  that must be answered within `connect_timeout_s`; if not, every pending caller fails
  UNAVAILABLE (BOOTSTRAP_UNREACHABLE) at once, not at its deadline;
- a stream that breaks (the service restarted) is reopened and whatever was not answered is sent
  again (`_requeue`); after `max_reconnects` breaks in a row with nothing answered in between,
  pending callers fail with the stream's error (subclasses reset `_breaks` when answers come);
- a write on a stream that already ended counts as a break, like a read error.

Subclasses say how to open the stream, what the handshake message is, what is pending, how to
write it, how to dispatch a response, what to send again after a break and how to fail everyone.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging

import grpc

from pdmesh.errors import PdmeshError, Unavailable
from pdmesh.reasons import Reason

log = logging.getLogger(__name__)


class TaggedStream(abc.ABC):
    """The connection, writer, reader and reconnect logic of one shared stream."""

    #: What the stream is called in messages ("lookup", "registration").
    kind = "bootstrap"

    def __init__(self, stub, address: str, *, connect_timeout_s: float = 1.0,
                 max_reconnects: int = 3) -> None:
        self._stub = stub
        self._address = address
        self._connect_timeout_s = connect_timeout_s
        self._max_reconnects = max_reconnects
        self._call = None
        self._reader: asyncio.Task | None = None
        self._writer: asyncio.Task | None = None
        self._tags = itertools.count(1)
        self._handshakes: dict[int, asyncio.Future] = {}
        self._breaks = 0
        self._closed = False

    # ---- what a kind of stream says --------------------------------------------------------

    @abc.abstractmethod
    def _open(self):
        """Open the stream call (with wait_for_ready)."""

    @abc.abstractmethod
    def _handshake_request(self, tag: int):
        """The empty tagged request that proves a new stream works."""

    @abc.abstractmethod
    def _has_pending(self) -> bool:
        """Whether anything waits to be written."""

    @abc.abstractmethod
    async def _write_pending(self, call) -> None:
        """Write what is pending as one message (or nothing, if every caller gave up)."""

    @abc.abstractmethod
    def _dispatch(self, response) -> None:
        """Answer the callers a response (not a handshake's) is for."""

    @abc.abstractmethod
    def _requeue(self) -> None:
        """After a break: queue again whatever was written but not answered."""

    @abc.abstractmethod
    def _fail_all(self, error: PdmeshError) -> None:
        """Fail every pending caller with `error` and forget them."""

    # ---- shared ----------------------------------------------------------------------------

    def _closed_error(self) -> Unavailable:
        return Unavailable(f"the bootstrap client for {self._address} was closed", reason=Reason.CLIENT_CLOSED)

    async def close(self) -> None:
        self._closed = True
        self._fail_all(self._closed_error())
        for task in (self._writer, self._reader):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def _kick(self) -> None:
        if self._writer is None and not self._closed:
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._has_pending():
                if self._call is None:
                    await self._connect()
                    continue
                call = self._call
                try:
                    await self._write_pending(call)
                except grpc.aio.AioRpcError as exc:  # the stream broke: requeue, reconnect, go on
                    self._on_break(call, PdmeshError.from_rpc_error(exc))
                except asyncio.InvalidStateError:  # it ended before the reader noticed: the same
                    self._on_break(call, Unavailable(
                        f"the bootstrap service at {self._address} ended the {self.kind} stream"))
        except PdmeshError as exc:
            self._fail_all(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - never strand callers
            log.exception("bootstrap %s stream writer failed", self.kind)
            self._fail_all(Unavailable(f"bootstrap {self.kind} stream failed: {exc}"))
        finally:
            self._writer = None

    async def _connect(self) -> None:
        """Open the stream and prove it works with a handshake."""
        if self._breaks > 1:  # broke again right after reconnecting: back off a little
            await asyncio.sleep(min(0.05 * 2 ** self._breaks, 0.5))
        call = self._open()
        tag = next(self._tags)
        handshake = self._handshakes[tag] = asyncio.get_running_loop().create_future()
        handshake.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._call = call
        self._reader = asyncio.get_running_loop().create_task(self._read(call))
        try:
            await asyncio.wait_for(self._handshake(call, tag, handshake), self._connect_timeout_s)
        except (asyncio.TimeoutError, TimeoutError, grpc.aio.AioRpcError, PdmeshError) as exc:
            self._handshakes.pop(tag, None)
            if self._call is call:
                self._call = None
            call.cancel()
            detail = exc.message if isinstance(exc, PdmeshError) else type(exc).__name__
            raise Unavailable(
                f"the bootstrap service at {self._address} is unreachable (no answer within "
                f"{self._connect_timeout_s:g} s: {detail})", reason=Reason.BOOTSTRAP_UNREACHABLE,
                metadata={"address": self._address}) from None

    async def _handshake(self, call, tag: int, handshake: asyncio.Future) -> None:
        await call.write(self._handshake_request(tag))
        await handshake

    async def _read(self, call) -> None:
        error: PdmeshError
        try:
            read, eof = call.read, grpc.aio.EOF
            while (response := await read()) is not eof:  # cheaper than `async for` (no generator)
                handshake = self._handshakes.pop(response.tag, None) if response.tag else None
                if handshake is not None:
                    if not handshake.done():
                        handshake.set_result(None)
                else:
                    self._dispatch(response)
            error = Unavailable(f"the bootstrap service at {self._address} closed the {self.kind} stream")
        except grpc.aio.AioRpcError as exc:
            error = PdmeshError.from_rpc_error(exc)
        except asyncio.CancelledError:
            return
        self._on_break(call, error)

    def _on_break(self, call, error: PdmeshError) -> None:
        if self._call is not call or self._closed:
            return
        self._call = None
        self._breaks += 1
        for handshake in self._handshakes.values():  # a connect in progress fails now
            if not handshake.done():
                handshake.set_exception(error)
        self._handshakes.clear()
        self._requeue()
        if self._breaks > self._max_reconnects:
            self._breaks = 0
            self._fail_all(error)
            return
        if self._has_pending():
            log.info("%s stream to %s broke (%s); reconnecting", self.kind, self._address,
                     error.code.name)
            self._kick()
