"""The bootstrap registry: prefill instances and room -> prefill DP rank records. Plain Python.

No I/O happens here, least of all under the lock: the servicer translates protos and statuses,
this module keeps the table. Every operation is O(1) in the number of rooms (batches: O(batch)).

- Rooms live `room_ttl_s` (plus at most one bucket's granularity, 1 s or less) unless removed.
  Records sit in expiry buckets (one open bucket per instance) appended in time order, so expiry
  pops buckets off the front: amortised O(1), done on every access and by the service's sweeper.
  When an instance is replaced (new epoch), deregistered or forgotten, its rooms go at once (its
  buckets are found without touching other rooms). So every record in the table is live and a
  lookup is one dict hit.
- Entries are bounded: `max_rooms` records and `max_waiters` waits; beyond, RESOURCE_EXHAUSTED.
- A wait is a callback `callback(room, dp_rank)` kept per room; registering the room pops the
  callbacks under the lock and calls them after releasing it. Callers remove waits they give up
  (`unwatch`), so nothing waits unbounded.
- Registration is idempotent: the same room, instance and rank with the same (or an empty)
  request_id is a retry; another rank, another instance or another non-empty request_id is
  ALREADY_EXISTS (reason ROOM_ALREADY_REGISTERED), which also catches two requests sharing a room.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import operator
import threading
import time
from typing import Callable, NamedTuple, Sequence

from pdmesh.bootstrap.v1 import bootstrap_pb2
from pdmesh.errors import AlreadyExists, FailedPrecondition, FollowBootstrapRoomConflict, \
    InvalidArgument, NotFound, PdmeshError, ResourceExhausted
from pdmesh.reasons import Reason
from pdmesh.rules import FOLLOW, FORCE_QUERY_ENV, MAX_ROOM, validate_dp_rank, validate_room
from pdmesh.server.instances import MAX_ID_CHARS, Instance, validate_instance, validate_instance_id

log = logging.getLogger(__name__)
_RANK = operator.itemgetter(0)  # the dp_rank of a stored record
Callback = Callable[[int, int], None]


class RoomRecord(NamedTuple):
    """A live room as the registry reports it."""

    bootstrap_room: int
    dp_rank: int
    instance_id: str
    epoch: int


class _Bucket:
    __slots__ = ("expires_at", "instance", "rooms")

    def __init__(self, expires_at: float, instance: Instance) -> None:
        self.expires_at = expires_at
        self.instance = instance
        self.rooms: list[int] = []


class Registry:
    """Instances and rooms of one bootstrap service. Thread-safe; callbacks run outside the lock."""

    def __init__(self, *, room_ttl_s: float = 120.0, max_rooms: int = 1 << 20,
                 max_waiters: int = 1 << 16, max_instances: int = 1024, instance_ttl_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if room_ttl_s <= 0 or max_rooms < 1 or max_waiters < 1 or max_instances < 1:
            raise ValueError("room_ttl_s, max_rooms, max_waiters and max_instances must be positive")
        self.room_ttl_s = room_ttl_s
        self.max_rooms = max_rooms
        self.max_waiters = max_waiters
        self.max_instances = max_instances
        self.instance_ttl_s = instance_ttl_s  # 0: instances never expire (liveness is reported only)
        self._granularity = min(1.0, room_ttl_s / 16)
        self._clock = clock
        self._lock = threading.Lock()
        self._instances: dict[str, Instance] = {}
        # room -> (dp_rank, instance, request_id, bucket)
        self._rooms: dict[int, tuple[int, Instance, str, _Bucket]] = {}
        self._buckets: collections.deque[_Bucket] = collections.deque()
        self._open: dict[str, _Bucket] = {}  # instance id -> its newest bucket
        self._tracked = 0  # entries in buckets, dead ones included (compacted when mostly dead)
        self._waiters: dict[int, list[Callback]] = {}
        self._num_waiters = 0
        self._instance_listeners: list[Callable[[str, int | None], None]] = []

    # ---- instance changes ------------------------------------------------------------------

    def add_instance_listener(self, listener: Callable[[str, int | None], None]) -> None:
        """Call `listener(instance_id, epoch)` (outside the lock) when an instance registers a
        new epoch, and `listener(instance_id, None)` when it deregisters."""
        self._instance_listeners.append(listener)

    def remove_instance_listener(self, listener: Callable[[str, int | None], None]) -> None:
        with contextlib.suppress(ValueError):
            self._instance_listeners.remove(listener)

    def instance_epoch(self, instance_id: str) -> int | None:
        """The registered epoch of `instance_id`, or None when it is not registered."""
        inst = self._instances.get(instance_id)
        return None if inst is None else inst.epoch

    def _tell(self, instance_id: str, epoch: int | None) -> None:
        for listener in list(self._instance_listeners):
            try:
                listener(instance_id, epoch)
            except Exception:
                log.exception("instance listener failed")

    # ---- instances -------------------------------------------------------------------------

    def register_instance(self, info: bootstrap_pb2.InstanceInfo) -> bool:
        """Publish `info`; True if recorded anew (new id or higher epoch), False for a retry."""
        validate_instance(info)
        copy = bootstrap_pb2.InstanceInfo()
        copy.CopyFrom(info)
        with self._lock:
            now = self._clock()
            old = self._instances.get(info.instance_id)
            if old is not None:
                if old.epoch == info.epoch:
                    if old.info != copy:
                        raise AlreadyExists(
                            f"instance {info.instance_id} epoch {info.epoch} is registered with other "
                            "info; a restarted or reconfigured instance must use a new, higher epoch",
                            reason=Reason.INSTANCE_EPOCH_CONFLICT,
                            metadata={"instance_id": info.instance_id, "epoch": info.epoch})
                    old.last_seen = now
                    return False
                if info.epoch < old.epoch:
                    raise FailedPrecondition(
                        f"instance {info.instance_id} epoch {info.epoch} is older than the registered "
                        f"epoch {old.epoch}: this process was replaced", reason=Reason.INSTANCE_EPOCH_STALE,
                        metadata={"instance_id": info.instance_id, "epoch": info.epoch,
                                  "registered_epoch": old.epoch})
            elif len(self._instances) >= self.max_instances:
                self._expire_instances(now)
                if len(self._instances) >= self.max_instances:
                    raise ResourceExhausted(
                        f"the registry holds its maximum of {self.max_instances} instances",
                        reason=Reason.TOO_MANY_INSTANCES, metadata={"max_instances": self.max_instances})
            if old is not None:  # a new epoch: the old epoch's rooms (and KV) are gone
                self._drop_instance(old)
            self._instances[info.instance_id] = Instance(copy, now)
        if old is not None:
            self._tell(info.instance_id, info.epoch)
        return True

    def deregister_instance(self, instance_id: str, epoch: int = 0) -> None:
        with self._lock:
            inst = self._live_instance(instance_id, self._clock())
            if epoch and inst.epoch != epoch:
                raise self._epoch_mismatch(inst, epoch)
            self._drop_instance(inst)
        self._tell(instance_id, None)

    def heartbeat(self, instance_id: str, epoch: int) -> None:
        with self._lock:
            now = self._clock()
            inst = self._live_instance(instance_id, now)
            if inst.epoch != epoch:
                raise self._epoch_mismatch(inst, epoch)
            inst.last_seen = now

    def get_instance(self, instance_id: str) -> tuple[bootstrap_pb2.InstanceInfo, float]:
        """The registered info and the seconds since the instance was last seen."""
        with self._lock:
            now = self._clock()
            inst = self._live_instance(instance_id, now)
            return inst.info, now - inst.last_seen

    def list_instances(self) -> list[bootstrap_pb2.InstanceInfo]:
        with self._lock:
            self._expire_instances(self._clock())
            return [inst.info for inst in self._instances.values()]

    def _live_instance(self, instance_id: str, now: float) -> Instance:
        validate_instance_id(instance_id)
        inst = self._instances.get(instance_id)
        if inst is not None and self.instance_ttl_s and now - inst.last_seen > self.instance_ttl_s:
            self._drop_instance(inst)
            inst = None
        if inst is None:
            raise NotFound(f"instance {instance_id} is not registered here (register it first; an "
                           "instance registers again when this service restarts)",
                           reason=Reason.INSTANCE_NOT_FOUND, metadata={"instance_id": instance_id})
        return inst

    @staticmethod
    def _epoch_mismatch(inst: Instance, epoch: int) -> PdmeshError:
        return FailedPrecondition(
            f"instance {inst.instance_id} is registered with epoch {inst.epoch}, not {epoch}",
            reason=Reason.INSTANCE_EPOCH_MISMATCH,
            metadata={"instance_id": inst.instance_id, "epoch": epoch, "registered_epoch": inst.epoch})

    def _expire_instances(self, now: float) -> None:
        if self.instance_ttl_s:
            for inst in [i for i in self._instances.values()
                         if now - i.last_seen > self.instance_ttl_s]:
                self._drop_instance(inst)

    def _drop_instance(self, inst: Instance) -> None:
        """Forget `inst` and every room it registered (O(buckets + its rooms))."""
        del self._instances[inst.instance_id]
        self._open.pop(inst.instance_id, None)
        rooms = self._rooms
        for bucket in self._buckets:
            if bucket.instance is inst:
                for room in bucket.rooms:
                    rec = rooms.get(room)
                    if rec is not None and rec[3] is bucket:
                        del rooms[room]
                self._tracked -= len(bucket.rooms)
                bucket.rooms = []

    # ---- rooms -----------------------------------------------------------------------------

    def register_room(self, instance_id: str, room: int, dp_rank: int, request_id: str = "",
                      epoch: int = 0) -> bool:
        """Record room -> dp_rank of `instance_id`; True if new, False for an idempotent retry.

        Wakes every wait on the room (callbacks run after the lock is released).
        """
        validate_room(room)
        if len(request_id) > MAX_ID_CHARS:
            raise InvalidArgument(f"request_id must be at most {MAX_ID_CHARS} characters",
                                  reason=Reason.INVALID_REQUEST_ID, metadata={"bootstrap_room": room})
        with self._lock:
            now = self._clock()
            inst = self._live_instance(instance_id, now)
            self._check_room_rank(inst, room, dp_rank, epoch)
            self._expire_due(now)
            rec = self._rooms.get(room)
            if rec is not None:
                self._check_retry(rec, inst, room, dp_rank, request_id)
                return False
            if len(self._rooms) >= self.max_rooms:
                self._expire_rooms(now)
                if len(self._rooms) >= self.max_rooms:
                    raise ResourceExhausted(
                        f"the registry holds its maximum of {self.max_rooms} rooms; remove rooms "
                        "once their KV is sent, or raise --max-rooms",
                        reason=Reason.REGISTRY_FULL, metadata={"max_rooms": self.max_rooms})
            self._rooms[room] = (dp_rank, inst, request_id, self._track(room, inst, now))
            callbacks = self._waiters.pop(room, None)
            if callbacks:
                self._num_waiters -= len(callbacks)
        if callbacks:
            for callback in callbacks:
                try:
                    callback(room, dp_rank)
                except Exception:  # a waiter's bug must not break the registration
                    log.exception("room %d waiter callback failed", room)
        return True

    def is_watched(self, room: int) -> bool:
        """Whether a lookup waits for `room` now (a hint: no lock, the answer may change at once)."""
        return room in self._waiters

    @staticmethod
    def _check_room_rank(inst: Instance, room: int, dp_rank: int, epoch: int) -> None:
        if epoch and epoch != inst.epoch:
            raise Registry._epoch_mismatch(inst, epoch)
        validate_dp_rank(dp_rank, inst.dp_size)
        if inst.method == FOLLOW and not inst.force_query and inst.dp_size > 1 \
                and dp_rank != room % inst.dp_size:
            raise FollowBootstrapRoomConflict(
                f"instance {inst.instance_id} uses follow_bootstrap_room, so decodes fetch room {room} "
                f"from rank {room % inst.dp_size} without a lookup; rank {dp_rank} cannot hold it. "
                f"Start the prefill with {FORCE_QUERY_ENV}=1 to register rooms on any rank.",
                metadata={"bootstrap_room": room, "dispatched_dp_rank": dp_rank,
                          "implied_dp_rank": room % inst.dp_size, "dp_size": inst.dp_size})

    @staticmethod
    def _check_retry(rec: tuple, inst: Instance, room: int, dp_rank: int, request_id: str) -> None:
        old_rank, old_inst, old_request, _ = rec
        if old_rank == dp_rank and old_inst is inst and \
                (old_request == request_id or not old_request or not request_id):
            return
        raise AlreadyExists(
            f"room {room} is already registered to rank {old_rank} of instance {old_inst.instance_id}"
            f"{' by request ' + repr(old_request) if old_request else ''}; every request needs its "
            "own room", reason=Reason.ROOM_ALREADY_REGISTERED,
            metadata={"bootstrap_room": room, "registered_dp_rank": old_rank, "dp_rank": dp_rank,
                      "registered_instance_id": old_inst.instance_id, "instance_id": inst.instance_id,
                      "registered_request_id": old_request, "request_id": request_id})

    def _track(self, room: int, inst: Instance, now: float) -> _Bucket:
        """Put `room` in its instance's open expiry bucket (a new bucket every granularity)."""
        bucket = self._open.get(inst.instance_id)
        if bucket is None or bucket.expires_at < now + self.room_ttl_s:
            bucket = self._open[inst.instance_id] = _Bucket(
                now + self.room_ttl_s + self._granularity, inst)
            self._buckets.append(bucket)
        bucket.rooms.append(room)
        self._tracked += 1
        if self._tracked > 2 * len(self._rooms) + 4096:
            self._compact()
        return bucket

    def _compact(self) -> None:
        """Drop bucket entries of removed rooms (amortised: runs after as many removals as live rooms)."""
        rooms = self._rooms
        for bucket in self._buckets:
            bucket.rooms = [r for r in bucket.rooms if (rec := rooms.get(r)) is not None and rec[3] is bucket]
        self._tracked = sum(len(b.rooms) for b in self._buckets)

    def _expire_due(self, now: float) -> None:
        if self._buckets and self._buckets[0].expires_at <= now:
            self._expire_rooms(now)

    def lookup(self, room: int) -> RoomRecord | None:
        """The live record of `room`, or None. INVALID_ARGUMENT for an invalid room."""
        validate_room(room)
        with self._lock:
            self._expire_due(self._clock())
            rec = self._rooms.get(room)
        if rec is None:
            return None
        return RoomRecord(room, rec[0], rec[1].instance_id, rec[1].epoch)

    def remove_room(self, room: int) -> None:
        """Forget `room` (its expiry entry goes with its bucket). NOT_FOUND if it is not live."""
        validate_room(room)
        with self._lock:
            self._expire_due(self._clock())
            if room not in self._rooms:
                raise NotFound(f"room {room} is not registered (never, removed, or expired after "
                               f"{self.room_ttl_s:g} s)", reason=Reason.ROOM_NOT_FOUND,
                               metadata={"bootstrap_room": room})
            del self._rooms[room]

    def lookup_many(self, rooms: Sequence[int], wait: Callback | None = None
                    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """Look `rooms` up in one pass: (found rooms, their ranks, not found, invalid).

        With `wait`, every valid room not found gets `wait` as its waiter (see `watch`); if the
        waiter table is full, those rooms raise RESOURCE_EXHAUSTED for the whole call and nothing
        is left waiting.
        """
        with self._lock:
            self._expire_due(self._clock())
            records = list(map(self._rooms.get, rooms))
            if None not in records:  # every room found: no Python-level loop at all
                return list(rooms), list(map(_RANK, records)), [], []
            found, ranks, missing = [], [], []
            for room, rec in zip(rooms, records):
                if rec is None:
                    missing.append(room)
                else:
                    found.append(room)
                    ranks.append(rec[0])
            invalid = [r for r in missing if not 0 < r <= MAX_ROOM]
            if invalid:  # rare: only valid rooms are ever stored, so only a miss can be invalid
                missing = [r for r in missing if 0 < r <= MAX_ROOM]
            if wait is not None and missing:
                self._add_waiters(missing, wait)
        return found, ranks, missing, invalid

    def watch(self, room: int, callback: Callback) -> int | None:
        """The rank of `room` if it is registered now; else add `callback` as its waiter and return None.

        The callback runs once, as `callback(room, dp_rank)`, when the room registers, unless
        `unwatch` removed it first. RESOURCE_EXHAUSTED when `max_waiters` waits are pending.
        """
        validate_room(room)
        found, ranks, _, _ = self.lookup_many((room,), callback)
        return ranks[0] if found else None

    def _add_waiters(self, rooms: list[int], callback: Callback) -> None:
        if self._num_waiters + len(rooms) > self.max_waiters:
            raise ResourceExhausted(
                f"{self._num_waiters} lookups already wait here (max {self.max_waiters}); "
                "retry later or raise --max-waiters", reason=Reason.TOO_MANY_WAITERS,
                metadata={"max_waiters": self.max_waiters, "waiters": self._num_waiters})
        waiters = self._waiters
        for room in rooms:
            lst = waiters.get(room)
            if lst is None:
                waiters[room] = [callback]
            else:
                lst.append(callback)
        self._num_waiters += len(rooms)

    def unwatch(self, room: int, callback: Callback) -> bool:
        """Remove one wait of `callback` on `room`; False if it had already fired or was removed."""
        with self._lock:
            lst = self._waiters.get(room)
            if not lst:
                return False
            try:
                lst.remove(callback)
            except ValueError:
                return False
            if not lst:
                del self._waiters[room]
            self._num_waiters -= 1
            return True

    # ---- expiry and stats ------------------------------------------------------------------

    def expire(self) -> int:
        """Drop rooms past their TTL and instances past theirs; return the rooms dropped."""
        with self._lock:
            now = self._clock()
            self._expire_instances(now)
            return self._expire_rooms(now)

    def _expire_rooms(self, now: float) -> int:
        dropped = 0
        rooms = self._rooms
        while self._buckets and self._buckets[0].expires_at <= now:
            bucket = self._buckets.popleft()
            self._tracked -= len(bucket.rooms)
            for room in bucket.rooms:
                rec = rooms.get(room)
                if rec is not None and rec[3] is bucket:
                    del rooms[room]
                    dropped += 1
            if self._open.get(bucket.instance.instance_id) is bucket:
                del self._open[bucket.instance.instance_id]
        return dropped

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"rooms": len(self._rooms), "waiters": self._num_waiters,
                    "instances": len(self._instances)}
