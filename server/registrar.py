"""The client side of the RegisterRoomsStream stream: ONE stream per bootstrap address, shared by
every registration of a process (`RoomRegistrar`, used through `BootstrapClient.register_room_streamed`).

Callers `await register(registration, timeout)`. Registrations made while a write is in flight go
out together in the next message (a writer task drains the queue), so 64 concurrent registrations
cost a few messages, not 64 calls. Answers are matched by the message's tag, then by position.

Connection, handshake and reconnects are the shared stream's (`pdmesh.server.tagged_stream`):
- after a break every registration not answered yet is sent again: each carries its request_id,
  so one the service did record before the break is answered as a retry, never as a conflict;
- a registration that the service refuses fails alone with its typed error; the stream goes on;
- each caller waits at most its `timeout` (DeadlineExceeded, reason BOOTSTRAP_TIMEOUT);
- `remove(room)` rides on the next message, unanswered (a prefill's records once transfers end).
"""

from __future__ import annotations

import asyncio

from pdmesh.bootstrap.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from pdmesh.errors import DeadlineExceeded, PdmeshError, Unavailable
from pdmesh.reasons import Reason
from pdmesh.server.tagged_stream import TaggedStream

Entry = tuple[bootstrap_pb2.RoomRegistration, asyncio.Future]


class RoomRegistrar(TaggedStream):
    """Multiplexes the room registrations of one process over one RegisterRoomsStream stream."""

    kind = "registration"

    def __init__(self, stub: bootstrap_pb2_grpc.BootstrapServiceStub, address: str, *,
                 connect_timeout_s: float = 1.0, max_reconnects: int = 3) -> None:
        super().__init__(stub, address, connect_timeout_s=connect_timeout_s,
                         max_reconnects=max_reconnects)
        self._out: list[Entry] = []  # queued, not written yet
        self._removals: list[int] = []  # rooms to remove, not written yet
        self._tagged: dict[int, list[Entry]] = {}  # written, not answered yet

    async def register(self, registration: bootstrap_pb2.RoomRegistration, timeout: float) -> bool:
        """Register one room; True if the record is new, False for a retry of the same request_id."""
        if self._closed:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._out.append((registration, future))
        self._kick()
        # a timer on the future itself: asyncio.wait_for would wrap it in one more future per call
        timer = loop.call_later(timeout, self._expire, future, registration, timeout)
        try:
            return await future
        finally:
            timer.cancel()

    def remove(self, room: int) -> None:
        """Have the service forget `room` with the next message; not answered (best effort: a
        removal lost with a broken stream leaves the record to its TTL)."""
        if not self._closed:
            self._removals.append(room)
            self._kick()

    def _expire(self, future: asyncio.Future, registration, timeout: float) -> None:
        if not future.done():
            future.set_exception(DeadlineExceeded(
                f"room {registration.bootstrap_room} was not registered at the bootstrap service at "
                f"{self._address} within {timeout:g} s", reason=Reason.BOOTSTRAP_TIMEOUT,
                metadata={"address": self._address,
                          "bootstrap_room": registration.bootstrap_room}))

    # ---- the stream's hooks ----------------------------------------------------------------

    def _open(self):
        return self._stub.RegisterRoomsStream(wait_for_ready=True)

    def _handshake_request(self, tag: int):
        return bootstrap_pb2.RegisterRoomsStreamRequest(tag=tag)

    def _has_pending(self) -> bool:
        return bool(self._out or self._removals)

    async def _write_pending(self, call) -> None:
        entries = [e for e in self._out if not e[1].done()]  # callers that gave up: dropped
        removals, self._out, self._removals = self._removals, [], []
        if not entries and not removals:
            return
        tag = next(self._tags)
        self._tagged[tag] = entries
        await call.write(bootstrap_pb2.RegisterRoomsStreamRequest(
            tag=tag, registrations=[r for r, _ in entries], remove_bootstrap_rooms=removals))

    def _dispatch(self, response: bootstrap_pb2.RegisterRoomsStreamResponse) -> None:
        entries = self._tagged.pop(response.tag, None)
        if entries is None:
            return
        self._breaks = 0  # registrations answered: the stream works
        results = response.results
        if len(results) != len(entries):
            error = Unavailable(f"the bootstrap service at {self._address} answered {len(results)} "
                                f"results to {len(entries)} registrations", reason=Reason.BOOTSTRAP_PROTOCOL)
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

    def _requeue(self) -> None:
        unanswered = [e for entries in self._tagged.values() for e in entries if not e[1].done()]
        self._tagged.clear()
        self._out[:0] = unanswered  # sent again on the next stream, in their order

    def _fail_all(self, error: PdmeshError) -> None:
        futures = [f for entries in self._tagged.values() for _, f in entries]
        futures += [f for _, f in self._out]
        self._tagged.clear()
        self._out.clear()
        self._removals.clear()
        for future in futures:
            if not future.done():
                future.set_exception(error)
