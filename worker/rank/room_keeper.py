"""Keeping a prefill rank's registered rooms known to a bootstrap service that restarted.

A prefill rank registers room -> rank before it offers the room's KV, and the decode looks the
room up. If the bootstrap service restarts in between, it forgets the room; the decode's lookup,
which its watcher sends again after the restart, would then wait for a room nobody registers,
until the request's deadline. `RoomKeeper` prevents that without a steady cost: it watches the
rank's one channel to the service, and only when that connection was made anew (or is down) does
it register again every room whose decode has not asked for it yet (idempotent: same request id),
all at once (they share the rank's registration stream), each until it succeeds. While the
connection stays up it sends nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import grpc

from pdmesh.errors import PdmeshError

log = logging.getLogger(__name__)

#: How often the rooms are checked against the connection (and re-registration retried).
ROOM_REFRESH_S = 1.0
READY = grpc.ChannelConnectivity.READY


class RoomKeeper:
    """Rooms a rank registered and still holds for their decodes."""

    def __init__(self, channel: grpc.aio.Channel, register: Callable[[int, str], Awaitable[object]],
                 asked: Callable[[int], bool], interval_s: float = ROOM_REFRESH_S) -> None:
        self._channel = channel
        self._register = register  # register(room, request_id): the idempotent registration
        self._asked = asked  # asked(room): the decode's transfer request has arrived
        self._interval_s = interval_s
        self._rooms: dict[int, tuple[str, int]] = {}  # room -> (request id, connection it was made on)
        self._state = channel.get_state(try_to_connect=False)
        self.connections = int(self._state == READY)  # times the channel became READY
        self._tasks: list[asyncio.Task] = []

    def add(self, room: int, request_id: str) -> None:
        """`room` was just registered (over the current connection)."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._tick())]
        self._rooms[room] = (request_id, self.connections)

    def discard(self, room: int) -> None:
        self._rooms.pop(room, None)

    async def _watch(self) -> None:
        while True:
            try:
                await self._channel.wait_for_state_change(self._state)
            except grpc.aio.UsageError:  # the channel was closed: the rank is stopping
                return
            new = self._channel.get_state(try_to_connect=False)
            self.connections += new == READY and self._state != READY
            self._state = new

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            if self._rooms:
                await self._refresh()

    async def _refresh(self) -> None:
        up = self._channel.get_state(try_to_connect=False) == READY
        due = []
        for room, (request_id, made_on) in list(self._rooms.items()):
            if self._asked(room):
                self._rooms.pop(room, None)
            elif not up or made_on != self.connections:
                due.append((room, request_id))
        if not due:
            return
        # All at once: over the registration stream they go out together, in one message or a few.
        results = await asyncio.gather(*(self._register(room, rid) for room, rid in due),
                                       return_exceptions=True)
        failed = []
        for (room, request_id), result in zip(due, results):
            if isinstance(result, PdmeshError):
                failed.append((room, result))  # the service is still away: again at the next tick
            elif isinstance(result, BaseException):
                raise result
            elif room in self._rooms:
                self._rooms[room] = (request_id, self.connections)
        if len(failed) < len(due):
            log.info("%d rooms registered again (the bootstrap connection was made anew)",
                     len(due) - len(failed))
        if failed:
            log.info("%d rooms: registering again at the bootstrap service failed (room %d: %s)",
                     len(failed), *failed[0])

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
