"""The DP-rank invariant over every combination (DESIGN.md): a simulated prefill, the REAL registry,
a simulated decode. The decode takes its KV from the rank that holds it, or the request fails with
a typed status; never a wrong rank, never a wait that nothing ends.

Drawn: dp_size 1..64, each load-balance method, force-query on/off, a hint (disagg_prefill_dp_rank)
or not, a routed rank or not (valid or out of range; the router's way sets both to one value), any
63-bit room plus invalid ones, which side arrives first.
"""

from __future__ import annotations

import asyncio
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdmesh.common.v1 import common_pb2
from pdmesh.errors import DeadlineExceeded, NotFound, PdmeshError
from pdmesh.rules import MAX_ROOM, PrefillAction, decode_rule, prefill_rule, validate_dp_rank
from pdmesh.server.registry import Registry
from pdmesh.server.demo import instance_info

METHODS = [common_pb2.LOAD_BALANCE_METHOD_ROUND_ROBIN, common_pb2.LOAD_BALANCE_METHOD_SHORTEST_QUEUE,
           common_pb2.LOAD_BALANCE_METHOD_FOLLOW_BOOTSTRAP_ROOM]
FOLLOW = common_pb2.LOAD_BALANCE_METHOD_FOLLOW_BOOTSTRAP_ROOM
DECODE_DEADLINE_S = 0.02
ranks = st.none() | st.integers(0, 70)
rooms = st.integers(1, MAX_ROOM) | st.sampled_from([0, MAX_ROOM + 1, (1 << 64) - 1])


def simulated_prefill(registry: Registry, dp_size: int, method: int, force: bool, room: int,
                      routed: int | None, hint: int | None, balancer_pick: int) -> int:
    """Dispatch and run the prefill rule; return the rank that holds the KV, or raise typed."""
    if routed is not None:
        rank = validate_dp_rank(routed, dp_size, field="routed_dp_rank")
    elif method == FOLLOW:
        rank = room % dp_size if 0 < room <= MAX_ROOM else 0
    else:
        rank = balancer_pick % dp_size  # round robin / shortest queue: any rank
    if prefill_rule(rank, dp_size, room, method, force, hint) is PrefillAction.REGISTER:
        registry.register_room("prefill-a", room, rank, request_id=f"req-{room}")
    return rank


async def simulated_decode(registry: Registry, room: int, hint: int | None, dp_size: int,
                           method: int, force: bool, started: asyncio.Future | None) -> int:
    """Resolve the prefill rank by the decode rule; a lookup waits until the deadline at most."""
    resolution = decode_rule(room, hint, dp_size, method, force)
    if not resolution.needs_lookup:
        return resolution.dp_rank
    future = started or asyncio.get_running_loop().create_future()
    if started is None:
        watch(registry, room, future)
    try:
        return await asyncio.wait_for(future, DECODE_DEADLINE_S)
    except (asyncio.TimeoutError, TimeoutError):
        raise DeadlineExceeded(f"room {room} not registered in time", reason="ROOM_WAIT_TIMEOUT") from None
    finally:
        registry.unwatch(room, future.callback)


def watch(registry: Registry, room: int, future: asyncio.Future) -> None:
    def callback(_room: int, rank: int) -> None:
        if not future.done():
            future.set_result(rank)
    future.callback = callback
    rank = registry.watch(room, callback)
    if rank is not None:
        future.set_result(rank)


def simulated_transfer(held: dict[int, int], rank: int, room: int) -> None:
    """The decode asks prefill `rank` for `room`; a rank that does not hold it answers NOT_FOUND
    (after its bounded wait, DESIGN.md)."""
    if held.get(rank) != room:
        raise NotFound(f"prefill rank {rank} does not hold room {room}", reason="ROOM_NOT_FOUND")


def _needs_lookup(room, hint, dp_size, method, force) -> bool:
    try:
        return decode_rule(room, hint, dp_size, method, force).needs_lookup
    except PdmeshError:
        return False


async def one_request(dp_size, method, force, room, routed, hint, pick, decode_first):
    registry = Registry(max_waiters=16)
    registry.register_instance(instance_info("prefill-a", epoch=1, dp_size=dp_size, method=method,
                                             force_query=force))
    early = None
    if decode_first and _needs_lookup(room, hint, dp_size, method, force):
        early = asyncio.get_running_loop().create_future()  # the decode waits before the prefill runs
        watch(registry, room, early)
    holder = prefill_error = None
    try:
        holder = simulated_prefill(registry, dp_size, method, force, room, routed, hint, pick)
    except PdmeshError as exc:
        prefill_error = exc
    t0 = time.perf_counter()
    try:
        got = await simulated_decode(registry, room, hint, dp_size, method, force, early)
    except PdmeshError as exc:
        got, decode_error = None, exc
    else:
        decode_error = None
    waited = time.perf_counter() - t0
    return registry, holder, prefill_error, got, decode_error, waited


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dp_size=st.integers(1, 64), method=st.sampled_from(METHODS), force=st.booleans(), room=rooms,
       routed=ranks, hint=ranks, router_pins=st.booleans(), pick=st.integers(0, 1 << 16),
       decode_first=st.booleans())
def test_decode_never_takes_a_wrong_rank(dp_size, method, force, room, routed, hint, router_pins,
                                         pick, decode_first):
    if router_pins and routed is not None:
        hint = routed  # the router sends its pinned rank to P as routed and to both as the hint
    registry, holder, prefill_error, got, decode_error, waited = asyncio.run(
        one_request(dp_size, method, force, room, routed, hint, pick, decode_first))
    held = {holder: room} if prefill_error is None else {}  # prefill rank -> the room whose KV it holds
    outcome = decode_error
    if got is not None:
        try:
            simulated_transfer(held, got, room)
        except PdmeshError as exc:
            outcome = exc
    if prefill_error is None:
        # The KV exists on `holder`: the decode must find exactly that rank and get it.
        assert outcome is None, f"prefill on rank {holder} succeeded but the decode failed: {outcome}"
        assert got == holder
    else:
        # Nothing holds the KV: the request must fail with a typed status, whichever side says so.
        assert isinstance(outcome, PdmeshError), f"prefill failed ({prefill_error}) but decode got {got}"
    # Nothing waits without end: every wait ended within its deadline and left no waiter behind.
    assert waited < DECODE_DEADLINE_S + 1.0
    assert registry.stats()["waiters"] == 0
