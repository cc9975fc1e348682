"""The router's own bound on each state of a sample, with real processes.

Every KV chunk of the prefill is packed `PACK_DELAY_S` late (the rank's debug fault hook), longer
than the router's `--first-token-timeout-s`: the client's deadline is long (60 s), yet the sample
fails DEADLINE_EXCEEDED ROUTER_FIRST_TOKEN_TIMEOUT within the bound, the router logs the room and
state, and both sides free what the room held.
"""

from __future__ import annotations

import asyncio

import pytest

from testkit.faultkit import FaultMesh, request

FIRST_TOKEN_S = 1.5
PACK_DELAY_S = 6.0
MARGIN_S = 4.0  # scheduling noise on a loaded 2-core machine


@pytest.fixture(scope="module")
def mesh():
    m = FaultMesh("rb", pack_delay_s=PACK_DELAY_S)
    m.router_args = ["--first-token-timeout-s", str(FIRST_TOKEN_S)]
    m.start()
    yield m
    m.stop()


def test_a_first_token_that_never_comes_in_time_fails_typed_within_the_routers_bound(mesh):
    async def go():
        async with mesh.client() as client:
            return await request(client, "bounded", max_new_tokens=2, timeout=60.0)
    o = asyncio.run(go())
    assert o.code == "DEADLINE_EXCEEDED" and o.error.reason == "ROUTER_FIRST_TOKEN_TIMEOUT", o.error
    assert o.error.metadata["state"] == "WAITING_FOR_FIRST_TOKEN"
    assert o.ended - o.started < FIRST_TOKEN_S + MARGIN_S, o.ended - o.started
    router = mesh.procs["router"]
    assert any("WAITING_FOR_FIRST_TOKEN" in line and "room" in line for line in router.lines), router.tail()
    assert mesh.settled(PACK_DELAY_S + 30)  # the pack in flight finishes, then every page is back
