"""Unit tests of the bootstrap registry (pdmesh.server.registry): plain Python, a fake clock."""

from __future__ import annotations

import time

import pytest

from pdmesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from pdmesh.common.v1 import common_pb2
from pdmesh.rules import MAX_ROOM
from pdmesh.server.demo import instance_info
from pdmesh.server.registry import Registry, RoomRecord


FOLLOW = common_pb2.LOAD_BALANCE_METHOD_FOLLOW_BOOTSTRAP_ROOM


def make_info(instance_id: str = "prefill-a", *, epoch: int = 1, **kw):
    return instance_info(instance_id, epoch=epoch, **kw)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def reg(clock):
    registry = Registry(room_ttl_s=120.0, max_rooms=100, max_waiters=10, clock=clock)
    registry.register_instance(make_info("prefill-a", dp_size=4))
    return registry


# ---- instances ------------------------------------------------------------------------------

def test_register_instance_is_idempotent_for_same_id_and_epoch(reg):
    assert reg.register_instance(make_info("prefill-a", dp_size=4)) is False
    info, age = reg.get_instance("prefill-a")
    assert info.dp_size == 4 and age == 0


def test_same_epoch_with_other_info_is_already_exists(reg):
    with pytest.raises(AlreadyExists) as exc:
        reg.register_instance(make_info("prefill-a", dp_size=2))
    assert exc.value.reason == "INSTANCE_EPOCH_CONFLICT"
    assert reg.get_instance("prefill-a")[0].dp_size == 4  # unchanged


def test_new_epoch_replaces_and_forgets_the_old_rooms(reg):
    reg.register_room("prefill-a", 7, 3)
    assert reg.register_instance(make_info("prefill-a", epoch=2, dp_size=4)) is True
    assert reg.lookup(7) is None
    assert reg.stats()["rooms"] == 0
    with pytest.raises(FailedPrecondition) as exc:  # the old process retrying is stale
        reg.register_instance(make_info("prefill-a", epoch=1, dp_size=4))
    assert exc.value.reason == "INSTANCE_EPOCH_STALE"
    with pytest.raises(FailedPrecondition) as exc:
        reg.register_room("prefill-a", 8, 0, epoch=1)
    assert exc.value.reason == "INSTANCE_EPOCH_MISMATCH"


@pytest.mark.parametrize("change,reason", [
    ({"instance_id": ""}, "INVALID_INSTANCE_ID"),
    ({"instance_id": "x" * 129}, "INVALID_INSTANCE_ID"),
    ({"epoch": 0}, "INVALID_INSTANCE_INFO"),
    ({"dp_size": 0}, "INVALID_DP_SIZE"),
    ({"dp_size": 100_000}, "INVALID_DP_SIZE"),
    ({"tp_size": 0}, "INVALID_INSTANCE_INFO"),
    ({"pp_size": 5000}, "INVALID_INSTANCE_INFO"),
    ({"load_balance_method": 0}, "INVALID_INSTANCE_INFO"),
    ({"load_balance_method": 99}, "INVALID_INSTANCE_INFO"),
])
def test_bad_instance_info_is_invalid_and_changes_nothing(reg, change, reason):
    with pytest.raises(InvalidArgument) as exc:
        reg.register_instance(make_info(**{"instance_id": "prefill-b", **change}))
    assert exc.value.reason == reason
    assert [i.instance_id for i in reg.list_instances()] == ["prefill-a"]


def test_bad_endpoints_and_layout_are_invalid(reg):
    info = make_info("prefill-b", dp_size=2)
    del info.rank_endpoints[1]
    bad = [info]
    info = make_info("prefill-b", dp_size=2)
    info.rank_endpoints[1].dp_rank = 0
    bad.append(info)
    info = make_info("prefill-b", dp_size=2)
    info.rank_endpoints[0].transfer_address = "no-port"
    bad.append(info)
    info = make_info("prefill-b", dp_size=2)
    info.kv_layout.page_size = 0
    bad.append(info)
    info = make_info("prefill-b", dp_size=2)
    info.ClearField("kv_layout")
    bad.append(info)
    for info in bad:
        with pytest.raises(InvalidArgument):
            reg.register_instance(info)
    assert len(reg.list_instances()) == 1


def test_heartbeat_deregister_and_instance_ttl(clock):
    reg = Registry(instance_ttl_s=10.0, clock=clock)
    reg.register_instance(make_info("prefill-a"))
    clock.now += 8
    reg.heartbeat("prefill-a", 1)
    clock.now += 8
    assert reg.get_instance("prefill-a")[1] == pytest.approx(8)
    with pytest.raises(FailedPrecondition):
        reg.heartbeat("prefill-a", 2)
    clock.now += 3  # 11 s since the last heartbeat
    with pytest.raises(NotFound) as exc:
        reg.heartbeat("prefill-a", 1)
    assert exc.value.reason == "INSTANCE_NOT_FOUND"
    reg.register_instance(make_info("prefill-a"))
    reg.deregister_instance("prefill-a")
    with pytest.raises(NotFound):
        reg.get_instance("prefill-a")


def test_too_many_instances(clock):
    reg = Registry(max_instances=2, clock=clock)
    reg.register_instance(make_info("a"))
    reg.register_instance(make_info("b"))
    with pytest.raises(ResourceExhausted) as exc:
        reg.register_instance(make_info("c"))
    assert exc.value.reason == "TOO_MANY_INSTANCES"


# ---- rooms ----------------------------------------------------------------------------------

def test_register_and_lookup(reg):
    assert reg.register_room("prefill-a", MAX_ROOM, 0, "r1") is True
    assert reg.lookup(MAX_ROOM) == RoomRecord(MAX_ROOM, 0, "prefill-a", 1)
    assert reg.lookup(5) is None


def test_idempotent_request_id_and_already_exists(reg):
    assert reg.register_room("prefill-a", 7, 2, "req-1") is True
    assert reg.register_room("prefill-a", 7, 2, "req-1") is False  # retry
    assert reg.register_room("prefill-a", 7, 2, "") is False  # no request id: same rank is a retry
    with pytest.raises(AlreadyExists) as exc:  # another rank
        reg.register_room("prefill-a", 7, 1, "req-1")
    assert exc.value.reason == "ROOM_ALREADY_REGISTERED"
    assert exc.value.metadata["registered_dp_rank"] == "2"
    with pytest.raises(AlreadyExists):  # another request with the same room (n > 1 sharing a room)
        reg.register_room("prefill-a", 7, 2, "req-2")
    reg.register_instance(make_info("prefill-b", dp_size=4))
    with pytest.raises(AlreadyExists):  # another instance
        reg.register_room("prefill-b", 7, 2, "req-1")
    assert reg.lookup(7).dp_rank == 2


@pytest.mark.parametrize("args,exc_type,reason", [
    (("prefill-a", 0, 0), InvalidArgument, "INVALID_BOOTSTRAP_ROOM"),
    (("prefill-a", MAX_ROOM + 1, 0), InvalidArgument, "INVALID_BOOTSTRAP_ROOM"),
    (("prefill-a", 7, 4), InvalidArgument, "DP_RANK_OUT_OF_RANGE"),
    (("", 7, 0), InvalidArgument, "INVALID_INSTANCE_ID"),
    (("prefill-z", 7, 0), NotFound, "INSTANCE_NOT_FOUND"),
])
def test_bad_room_registration_changes_nothing(reg, args, exc_type, reason):
    with pytest.raises(exc_type) as exc:
        reg.register_room(*args)
    assert exc.value.reason == reason
    assert reg.stats()["rooms"] == 0


def test_follow_bootstrap_room_registration_must_match_the_implied_rank(clock):
    reg = Registry(clock=clock)
    reg.register_instance(make_info("f", dp_size=4, method=FOLLOW))
    with pytest.raises(FailedPrecondition) as exc:
        reg.register_room("f", 101, 2)
    assert exc.value.reason == "FOLLOW_BOOTSTRAP_ROOM_CONFLICT"
    assert reg.register_room("f", 101, 1)
    reg.register_instance(make_info("g", dp_size=4, method=FOLLOW, force_query=True))
    assert reg.register_room("g", 102, 3)  # force-query: any rank may register


def test_rooms_expire_after_ttl(reg, clock):
    reg.register_room("prefill-a", 7, 1)
    clock.now += 119.9
    assert reg.lookup(7) is not None
    clock.now += 1.2  # past ttl plus the bucket granularity (<= 1 s)
    assert reg.lookup(7) is None
    assert reg.stats()["rooms"] == 0
    reg.register_room("prefill-a", 7, 2)  # a fresh record after expiry
    assert reg.lookup(7).dp_rank == 2


def test_expire_drops_whole_buckets(reg, clock):
    for room in range(1, 51):
        reg.register_room("prefill-a", room, room % 4)
    clock.now += 60
    for room in range(51, 61):
        reg.register_room("prefill-a", room, 0)
    clock.now += 61.5
    assert reg.expire() == 50
    assert reg.stats()["rooms"] == 10


def test_rooms_are_bounded(clock):
    reg = Registry(room_ttl_s=10.0, max_rooms=3, clock=clock)
    reg.register_instance(make_info())
    for room in (1, 2, 3):
        reg.register_room("prefill-a", room, 0)
    with pytest.raises(ResourceExhausted) as exc:
        reg.register_room("prefill-a", 4, 0)
    assert exc.value.reason == "REGISTRY_FULL"
    assert reg.register_room("prefill-a", 3, 0) is False  # a retry needs no new entry
    reg.remove_room(1)
    reg.register_room("prefill-a", 4, 0)
    clock.now += 11.0
    reg.register_room("prefill-a", 5, 0)  # full table: expiry makes room
    assert reg.stats()["rooms"] == 1


def test_remove_room(reg):
    reg.register_room("prefill-a", 7, 1)
    reg.remove_room(7)
    assert reg.lookup(7) is None
    with pytest.raises(NotFound) as exc:
        reg.remove_room(7)
    assert exc.value.reason == "ROOM_NOT_FOUND"


def test_churn_compacts_without_losing_live_rooms(clock):
    reg = Registry(room_ttl_s=100.0, max_rooms=10_000, clock=clock)
    reg.register_instance(make_info(dp_size=4))
    live = set()
    for room in range(1, 20_001):
        reg.register_room("prefill-a", room, room % 4)
        if room % 10:
            reg.remove_room(room)
        else:
            live.add(room)
    assert reg._tracked < 3 * len(live) + 4096 + 10  # removed entries do not pile up
    assert all(reg.lookup(room).dp_rank == room % 4 for room in live)
    clock.now += 102
    assert reg.expire() == len(live)


# ---- waits ----------------------------------------------------------------------------------

def test_watch_fires_on_registration_outside_the_lock(reg):
    seen = []

    def callback(room, rank):  # re-enters the registry: deadlocks if called under the lock
        seen.append((room, rank, reg.lookup(room).dp_rank))

    assert reg.watch(9, callback) is None
    assert reg.stats()["waiters"] == 1
    reg.register_room("prefill-a", 9, 3)
    assert seen == [(9, 3, 3)]
    assert reg.stats()["waiters"] == 0
    assert reg.watch(9, callback) == 3  # already registered: answered at once, nothing kept


def test_unwatch_and_bounded_waiters(reg):
    calls = []
    callbacks = [lambda room, rank, i=i: calls.append(i) for i in range(10)]
    for i, cb in enumerate(callbacks):
        reg.watch(100 + i, cb)
    with pytest.raises(ResourceExhausted) as exc:
        reg.watch(200, callbacks[0])
    assert exc.value.reason == "TOO_MANY_WAITERS"
    assert reg.unwatch(100, callbacks[0]) is True
    assert reg.unwatch(100, callbacks[0]) is False
    reg.register_room("prefill-a", 100, 0)
    reg.register_room("prefill-a", 101, 0)
    assert calls == [1]
    with pytest.raises(InvalidArgument):
        reg.watch(0, callbacks[0])


def test_lookup_many_splits_found_missing_invalid(reg):
    reg.register_room("prefill-a", 5, 1)
    found, ranks, missing, invalid = reg.lookup_many([5, 6, 0, MAX_ROOM + 1])
    assert (found, ranks, missing, invalid) == ([5], [1], [6], [0, MAX_ROOM + 1])


def test_lookups_are_o1_in_the_number_of_rooms():
    def cost(n: int) -> float:
        reg = Registry(max_rooms=n + 10)
        reg.register_instance(make_info(dp_size=4))
        rooms = [(i * 0x9E3779B97F4A7C15) % MAX_ROOM + 1 for i in range(n)]
        for i, room in enumerate(rooms):
            reg.register_room("prefill-a", room, i % 4)
        probe = rooms[:: max(1, n // 1000)][:1000]
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for room in probe:
                reg.lookup(room)
            reg.lookup_many(probe)
            best = min(best, time.perf_counter() - t)
        return best

    # A complexity check, not a timing: with 200x the rooms an O(n) lookup would be ~200x slower;
    # an O(1) one pays only cache misses (1-3x measured, more on a machine other processes keep busy).
    small, large = cost(1_000), cost(200_000)
    assert large < 20 * small, f"lookups slowed {large / small:.1f}x with 200x the rooms"
