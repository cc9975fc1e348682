"""A prefill replaced under the same instance id with another rank policy heals at once.

Each decode rank caches the prefill's instance info (policy included). When a new process takes
the prefill's id with another load-balance method or force-query setting (a new epoch), a decode
that relied on the old policy must notice it where it relies on it: a lookup is failed at once by
the bootstrap service (the wait names the epoch it resolved), a fast-path fetch is refused at once
by the prefill rank (epoch check before any wait). Either way the decode refreshes the info,
resolves the rank again and the request goes through. Aim (issue 11): at most one typed failure
per decode rank per change, no request near its deadline; here none fails at all.
"""

from __future__ import annotations

import asyncio

import pytest

from pdmesh.common.v1 import common_pb2
from testkit.faultkit import FaultMesh, request, wait_until

DEADLINE_S = 30.0
BOUND_S = 10.0  # every request ends within this (a policy change costs a refresh, not a deadline)
RR = ["--load-balance-method", "round_robin"]
FOLLOW = ["--load-balance-method", "follow_bootstrap_room"]
FORCE = ["--force-query-prefill-dp-rank"]

# (policy after the change, the rank path an unpinned request then takes)
CHANGES = [
    ("round_robin -> follow_bootstrap_room", FOLLOW, common_pb2.RANK_PATH_FAST_PATH),
    ("force-query off -> on", FOLLOW + FORCE, common_pb2.RANK_PATH_LOOKUP),
    ("force-query on -> off", FOLLOW, common_pb2.RANK_PATH_FAST_PATH),
    ("follow_bootstrap_room -> round_robin", RR, common_pb2.RANK_PATH_LOOKUP),
]


@pytest.fixture(scope="module")
def mesh():
    m = FaultMesh("pc", pack_delay_s=0.0).start()
    yield m
    m.stop()


async def burst(mesh: FaultMesh, n: int, tag: str):
    async with mesh.client() as client:
        return await asyncio.gather(*(request(client, f"policy {tag} {i}", max_new_tokens=3,
                                              timeout=DEADLINE_S) for i in range(n)))


def test_a_prefill_replaced_with_another_policy_heals_at_once(mesh):
    warm = asyncio.run(burst(mesh, 8, "warm"))  # every decode rank caches the round_robin info
    assert all(o.ok for o in warm), [o.error for o in warm]
    assert {o.decode_rank for o in warm} == {0, 1}
    for name, policy, path in CHANGES:
        mesh.kill("prefill")
        mesh.prefill_policy = policy
        mesh.start_part("prefill")  # same address and instance id, new epoch, new policy
        assert wait_until(mesh.router_ready, 30), name
        outcomes = asyncio.run(burst(mesh, 16, name))
        failed = [o for o in outcomes if not o.ok]
        assert not failed, (name, [(o.code, o.error) for o in failed])
        assert all(o.ended - o.started < BOUND_S for o in outcomes), \
            (name, max(o.ended - o.started for o in outcomes))
        assert {o.path for o in outcomes} == {path}, (name, {o.path for o in outcomes})
    assert mesh.settled(30)
