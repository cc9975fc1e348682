"""The client side of the RegisterRoomsStream stream: ONE stream per bootstrap address, shared by
every registration of a process (`RoomRegistrar`, used through `BootstrapClient.register_room_streamed`).

Callers `await register(registration, timeout)`. Registrations made while a write is in flight go
out together in the next message (a writer task drains the queue), so 64 concurrent registrations
cost a few messages, not 64 calls. Answers are matched by the message's tag, then by position.

Failure handling is the lookup stream's (`pdmesh.server.watcher`):
- the stream is opened with wait_for_ready and a handshake (an empty tagged message) that must be
  answered within `connect_timeout_s`; if not, every pending caller fails UNAVAILABLE
  (BOOTSTRAP_UNREACHABLE) at once, not at its deadline;
- a stream that breaks (the service restarted) is reopened and every registration not answered
  yet is sent again: each carries its request_id, so one the service did record before the break
  is answered as a retry, never as a conflict. After `max_reconnects` breaks in a row with nothing
  answered in between, pending callers fail with the stream's error;
- a registration that the service refuses fails alone with its typed error; the stream goes on;
- each caller waits at most its `timeout` (DeadlineExceeded, reason BOOTSTRAP_TIMEOUT).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

import grpc

from pdmesh.bootstrap.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from pdmesh.errors import DeadlineExceeded, PdmeshError, Unavailable

log = logging.getLogger(__name__)
Entry = tuple[bootstrap_pb2.RoomRegistration, asyncio.Future]


class RoomRegistrar:
    """Multiplexes the room registrations of one process over one RegisterRoomsStream stream."""

    def __init__(self, stub: bootstrap_pb2_grpc.BootstrapServiceStub, address: str, *,
                 connect_timeout_s: float = 1.0, max_reconnects: int = 3) -> None:
        self._stub = stub
        self._address = address
        self._connect_timeout_s = connect_timeout_s
        self._max_reconnects = max_reconnects
        self._call = None
        self._reader: asyncio.Task | None = None
        self._writer: asyncio.Task | None = None
        self._tags = itertools.count(1)
        self._out: list[Entry] = []  # queued, not written yet
        self._tagged: dict[int, list[Entry]] = {}  # written, not answered yet
        self._breaks = 0
        self._closed = False

    async def register(self, registration: bootstrap_pb2.RoomRegistration, timeout: float) -> bool:
        """Register one room; True if the record is new, False for a retry of the same request_id."""
        if self._closed:
            raise Unavailable(f"the bootstrap client for {self._address} was closed", reason="CLIENT_CLOSED")
        future = asyncio.get_running_loop().create_future()
        self._out.append((registration, future))
        if self._writer is None and not self._closed:
            self._writer = asyncio.get_running_loop().create_task(self._drain())
        try:
            return await asyncio.wait_for(future, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise DeadlineExceeded(
                f"room {registration.bootstrap_room} was not registered at the bootstrap service at "
                f"{self._address} within {timeout:g} s", reason="BOOTSTRAP_TIMEOUT",
                metadata={"address": self._address,
                          "bootstrap_room": registration.bootstrap_room}) from None

    async def close(self) -> None:
        self._closed = True
        self._fail_all(Unavailable(f"the bootstrap client for {self._address} was closed",
                                   reason="CLIENT_CLOSED"))
        for task in (self._writer, self._reader):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._call is not None:
            self._call.cancel()
            self._call = None

    # ---- writing ---------------------------------------------------------------------------

    async def _drain(self) -> None:
        try:
            while self._out:
                if self._call is None:
                    await self._connect()
                    continue
                call = self._call
                entries = [e for e in self._out if not e[1].done()]  # callers that gave up: dropped
                self._out = []
                if not entries:
                    break
                tag = next(self._tags)
                self._tagged[tag] = entries
                try:
                    await call.write(bootstrap_pb2.RegisterRoomsStreamRequest(
                        tag=tag, registrations=[r for r, _ in entries]))
                except grpc.aio.AioRpcError as exc:  # the stream broke: requeue, reconnect, go on
                    self._on_break(call, PdmeshError.from_rpc_error(exc))
                except asyncio.InvalidStateError:  # it ended before the reader noticed: the same
                    self._on_break(call, Unavailable(
                        f"the bootstrap service at {self._address} ended the registration stream"))
        except PdmeshError as exc:
            self._fail_all(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - never strand callers
            log.exception("bootstrap registrar writer failed")
            self._fail_all(Unavailable(f"bootstrap registrar failed: {exc}"))
        finally:
            self._writer = None

    # ---- the stream ------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Open the stream and prove it works with a handshake (an empty tagged message)."""
        if self._breaks > 1:  # broke again right after reconnecting: back off a little
            await asyncio.sleep(min(0.05 * 2 ** self._breaks, 0.5))
        call = self._stub.RegisterRoomsStream(wait_for_ready=True)
        tag = next(self._tags)
        handshake = asyncio.get_running_loop().create_future()
        self._tagged[tag] = [(None, handshake)]
        self._call = call
        self._reader = asyncio.get_running_loop().create_task(self._read(call))
        try:
            await asyncio.wait_for(self._handshake(call, tag, handshake), self._connect_timeout_s)
        except (asyncio.TimeoutError, TimeoutError, grpc.aio.AioRpcError, PdmeshError) as exc:
            self._tagged.pop(tag, None)
            if self._call is call:
                self._call = None
            call.cancel()
            detail = exc.message if isinstance(exc, PdmeshError) else type(exc).__name__
            raise Unavailable(
                f"the bootstrap service at {self._address} is unreachable (no answer within "
                f"{self._connect_timeout_s:g} s: {detail})", reason="BOOTSTRAP_UNREACHABLE",
                metadata={"address": self._address}) from None

    @staticmethod
    async def _handshake(call, tag: int, handshake: asyncio.Future) -> None:
        await call.write(bootstrap_pb2.RegisterRoomsStreamRequest(tag=tag))
        await handshake

    async def _read(self, call) -> None:
        error: PdmeshError
        try:
            read, eof = call.read, grpc.aio.EOF
            while (response := await read()) is not eof:
                self._answer(response)
            error = Unavailable(f"the bootstrap service at {self._address} closed the registration stream")
        except grpc.aio.AioRpcError as exc:
            error = PdmeshError.from_rpc_error(exc)
        except asyncio.CancelledError:
            return
        self._on_break(call, error)

    def _answer(self, response: bootstrap_pb2.RegisterRoomsStreamResponse) -> None:
        entries = self._tagged.pop(response.tag, None)
        if entries is None:
            return
        if entries[0][0] is None:  # the handshake
            if not entries[0][1].done():
                entries[0][1].set_result(None)
            return
        self._breaks = 0  # registrations answered: the stream works
        results = response.results
        if len(results) != len(entries):
            error = Unavailable(f"the bootstrap service at {self._address} answered {len(results)} "
                                f"results to {len(entries)} registrations", reason="BOOTSTRAP_PROTOCOL")
            for _, future in entries:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(entries, results):
            if future.done():
                continue
            if result.HasField("status") and result.status.code:
                future.set_exception(PdmeshError.from_status_proto(result.status))
            else:
                future.set_result(result.created)

    def _on_break(self, call, error: PdmeshError) -> None:
        if self._call is not call or self._closed:
            return
        self._call = None
        self._breaks += 1
        unanswered = [e for entries in self._tagged.values() for e in entries if not e[1].done()]
        self._tagged.clear()
        for _, handshake in [e for e in unanswered if e[0] is None]:
            handshake.set_exception(error)  # a connect in progress fails now, not at its timeout
        unanswered = [e for e in unanswered if e[0] is not None]
        self._out[:0] = unanswered  # sent again on the next stream, in their order
        if self._breaks > self._max_reconnects:
            self._breaks = 0
            self._fail_all(error)
            return
        if self._out:
            log.info("registration stream to %s broke (%s); reconnecting", self._address,
                     error.code.name)
            if self._writer is None:
                self._writer = asyncio.get_running_loop().create_task(self._drain())

    def _fail_all(self, error: PdmeshError) -> None:
        futures = [f for entries in self._tagged.values() for _, f in entries]
        futures += [f for _, f in self._out]
        self._tagged.clear()
        self._out.clear()
        for future in futures:
            if not future.done():
                future.set_exception(error)
