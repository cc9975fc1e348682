"""The client side of the WatchRooms stream: ONE stream per bootstrap address, shared by every
waiting request of a process (`RoomWatcher`, used through `BootstrapClient`).

Callers `await wait_for_room(room, timeout)` or `await lookup_rooms(rooms, timeout)`. Requests
made in the same event-loop turn go out together in one message (a writer task drains them while
the previous write is in flight), so 64 concurrent lookups cost a few messages, not 64 calls.
Answers are matched by room (waits) or by the message's tag (lookups, pings).

Failure handling (connection, handshake and reconnects are the shared stream's,
`pdmesh.server.tagged_stream`):
- a local timer ends each wait at its timeout with DeadlineExceeded (reason ROOM_WAIT_TIMEOUT)
  and cancels the server-side wait once no local caller waits for the room any more;
- after a break every pending wait and every unanswered lookup is sent again; rooms registered
  after a restart of the service then resolve.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Iterable

from pdmesh.bootstrap.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from pdmesh.errors import DeadlineExceeded, PdmeshError
from pdmesh.reasons import Reason
from pdmesh.rules import MAX_ROOM, validate_room
from pdmesh.server.tagged_stream import TaggedStream

log = logging.getLogger(__name__)
_SERVER_WAIT_MARGIN_MS = 1000  # the server's wait outlives the local one, which decides the outcome
_RESEND_WAIT_MS = 60_000  # re-asked after the server's wait ran out while a caller still waits


class RoomWatcher(TaggedStream):
    """Multiplexes room lookups and waits of one process over one WatchRooms stream."""

    kind = "lookup"

    def __init__(self, stub: bootstrap_pb2_grpc.BootstrapServiceStub, address: str, *,
                 connect_timeout_s: float = 1.0, max_reconnects: int = 3) -> None:
        super().__init__(stub, address, connect_timeout_s=connect_timeout_s,
                         max_reconnects=max_reconnects)
        self._waits: dict[int, list[asyncio.Future]] = {}  # room -> local callers waiting for it
        self._tagged: dict[int, list[tuple[list[int] | None, asyncio.Future]]] = {}
        self._out_lookups: list[tuple[list[int] | None, asyncio.Future]] = []
        self._out_waits: dict[int, int] = {}  # room -> server wait_timeout_ms to ask for
        self._owners: dict[int, tuple[str, int]] = {}  # waited room -> (instance id, epoch) expected
        self._out_cancels: list[int] = []

    # ---- public ----------------------------------------------------------------------------

    async def wait_for_room(self, room: int, timeout: float,
                            owner: tuple[str, int] | None = None) -> int:
        """The prefill DP rank of `room` as soon as it is registered; DeadlineExceeded at `timeout`.
        With `owner` = (instance id, epoch): FAILED_PRECONDITION INSTANCE_EPOCH_CHANGED at once when
        that instance is (or becomes) registered under another epoch."""
        validate_room(room)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        waiters = self._waits.get(room)
        if waiters is None:
            if owner is not None:
                self._owners[room] = owner
            self._waits[room] = [future]
            self._out_waits[room] = max(self._out_waits.get(room, 0),
                                        int(timeout * 1000) + _SERVER_WAIT_MARGIN_MS)
            self._kick()
        else:
            waiters.append(future)
        timer = loop.call_later(timeout, self._time_out, room, future, timeout)
        try:
            return await future
        finally:
            timer.cancel()
            self._forget(room, future)

    async def lookup_rooms(self, rooms: Iterable[int], timeout: float) -> dict[int, int | None]:
        """The rank of each room now (None where not registered), in one round trip."""
        rooms = list(rooms)
        if rooms and (min(rooms) < 1 or max(rooms) > MAX_ROOM):
            for room in rooms:
                validate_room(room)
        return await self._tagged_call(rooms, timeout)

    async def ping(self, timeout: float) -> None:
        """One empty round trip on the stream (a liveness probe, and the benchmark's baseline)."""
        await self._tagged_call(None, timeout)

    # ---- requests --------------------------------------------------------------------------

    async def _tagged_call(self, rooms: list[int] | None, timeout: float):
        future = asyncio.get_running_loop().create_future()
        entry = (rooms, future)
        self._out_lookups.append(entry)
        self._kick()
        try:
            return await asyncio.wait_for(future, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise DeadlineExceeded(f"no answer from the bootstrap service at {self._address} within "
                                   f"{timeout:g} s", reason=Reason.BOOTSTRAP_TIMEOUT,
                                   metadata={"address": self._address}) from None

    def _time_out(self, room: int, future: asyncio.Future, timeout: float) -> None:
        if not future.done():
            future.set_exception(DeadlineExceeded(
                f"room {room} was not registered at {self._address} within {timeout:g} s: the prefill "
                "failed, was never sent this room, or has not reached it yet",
                reason=Reason.ROOM_WAIT_TIMEOUT, metadata={"bootstrap_room": room,
                                                      "waited_ms": int(timeout * 1000)}))

    def _forget(self, room: int, future: asyncio.Future) -> None:
        waiters = self._waits.get(room)
        if waiters is None or future not in waiters:
            return
        waiters.remove(future)
        if not waiters:  # nobody here waits any more: stop the server's wait too
            del self._waits[room]
            self._owners.pop(room, None)
            self._out_waits.pop(room, None)
            if self._call is not None:
                self._out_cancels.append(room)
                self._kick()

    # ---- the stream's hooks ----------------------------------------------------------------

    def _open(self):
        return self._stub.WatchRooms(wait_for_ready=True)

    def _handshake_request(self, tag: int):
        return bootstrap_pb2.WatchRoomsRequest(tag=tag)

    def _has_pending(self) -> bool:
        return bool(self._out_lookups or self._out_waits or self._out_cancels)

    async def _write_pending(self, call) -> None:
        tag = next(self._tags)
        self._tagged[tag] = self._out_lookups
        entries = self._out_lookups
        rooms = entries[0][0] or () if len(entries) == 1 else \
            list(itertools.chain.from_iterable(r for r, _ in entries if r))
        waits, cancels = self._out_waits, self._out_cancels
        self._out_lookups, self._out_waits, self._out_cancels = [], {}, []
        owners = self._owners
        request = bootstrap_pb2.WatchRoomsRequest(
            tag=tag, bootstrap_rooms=rooms, wait_bootstrap_rooms=list(waits),
            wait_timeout_ms=max(waits.values(), default=0), cancel_bootstrap_rooms=cancels,
            wait_owners=[_owner(owners.get(r)) for r in waits] if owners else ())
        await call.write(request)

    def _requeue(self) -> None:
        for tag in list(self._tagged):  # lookups in flight are asked again on the next stream
            self._out_lookups.extend(e for e in self._tagged.pop(tag) if not e[1].done())
        for room in self._waits:  # and every wait a caller still has
            self._out_waits.setdefault(room, _RESEND_WAIT_MS)

    def _dispatch(self, response: bootstrap_pb2.WatchRoomsResponse) -> None:
        found_rooms = response.bootstrap_rooms
        if found_rooms and self._waits:
            waits = self._waits
            for room, rank in zip(found_rooms, response.dp_ranks):
                self._owners.pop(room, None)
                futures = waits.pop(room, None)
                if futures:
                    for future in futures:
                        if not future.done():
                            future.set_result(rank)
        for room in response.expired_bootstrap_rooms:
            if room in self._waits:  # the server stopped waiting but a caller still does
                self._out_waits[room] = _RESEND_WAIT_MS
                self._kick()
        failed = {e.bootstrap_room: PdmeshError.from_status_proto(e.status) for e in response.errors}
        for room, error in failed.items():
            self._owners.pop(room, None)
            for future in self._waits.pop(room, ()):
                if not future.done():
                    future.set_exception(error)
        if found_rooms or response.expired_bootstrap_rooms:
            self._breaks = 0
        if response.tag:
            self._answer(response, failed)

    def _answer(self, response: bootstrap_pb2.WatchRoomsResponse, failed: dict) -> None:
        entries = self._tagged.pop(response.tag, None)
        if not entries:
            return
        found = dict(zip(response.bootstrap_rooms, response.dp_ranks)) if response.bootstrap_rooms else {}
        for rooms, future in entries:
            if future.done():
                continue
            if rooms is None:
                future.set_result(None)
            elif failed and any(r in failed for r in rooms):
                future.set_exception(next(failed[r] for r in rooms if r in failed))
            else:
                future.set_result(dict(zip(rooms, map(found.get, rooms))))

    def _fail_all(self, error: PdmeshError) -> None:
        futures = [f for fs in self._waits.values() for f in fs]
        futures += [f for entries in self._tagged.values() for _, f in entries]
        futures += [f for _, f in self._out_lookups]
        self._waits.clear()
        self._owners.clear()
        self._tagged.clear()
        self._out_lookups.clear()
        self._out_waits.clear()
        self._out_cancels.clear()
        for future in futures:
            if not future.done():
                future.set_exception(error)


def _owner(owner: tuple[str, int] | None) -> bootstrap_pb2.RoomOwner:
    return bootstrap_pb2.RoomOwner() if owner is None else \
        bootstrap_pb2.RoomOwner(instance_id=owner[0], epoch=owner[1])
