"""Load and drain with real processes: 1,000 requests at once through the router, then a drain.

One mesh serves the module: a bootstrap service (metrics on), prefill `pa` (dp 2,
follow_bootstrap_room: fast path, or hint when pinned), prefill `pb` (dp 2, round_robin: every
unpinned room registered and looked up), decode `d` (dp 2), and a router whose admission limits
hold 1,000 requests in flight. A wave mixes rank paths (a third pinned with routed_dp_rank) with
~5% injected failures: prompts with a token outside the vocabulary, clients that cancel
mid-stream, and pinned conflicts sent straight to the follow_bootstrap_room prefill. Every
request ends in its tokens or a typed status (count in == count out), no page leaks, the
registry holds no room afterwards, and a second identical wave leaves every process's private
memory (RssAnon, ranks included; shared pool mappings are not a leak) flat; a process that grew past the slack in wave 2 must stay flat in a
third wave (a leak keeps growing with every wave, allocator noise does not come back).
"""

from __future__ import annotations

import asyncio
import collections
import re
import secrets
import time
import urllib.request

import grpc
import pytest

from pdmesh.common.v1 import common_pb2
from pdmesh.errors import PdmeshError
from testkit.faultkit import free_port, request, rank_pids, rss_kib, settled, wait_until
from testkit.proc import Proc, start_all
from pdmesh.router.client import RouterClient
from pdmesh.router.v1 import router_pb2, router_pb2_grpc
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc

WAVE = 1000
INVALID, CANCELLED, CONFLICTS = 20, 15, 15  # 5% injected failures
GOOD = WAVE - INVALID - CANCELLED - CONFLICTS
MAX_NEW = 3
TIMEOUT_S = 120.0
#: A second identical wave may grow a process's RssAnon by at most this (allocator noise, caches).
RSS_SLACK_KIB = 12 * 1024


@pytest.fixture(scope="module")
def mesh():
    metrics_port = free_port()
    boot = Proc("load-bootstrap", ["bootstrap", "--port", "0", "--metrics-port", str(metrics_port)]).start()
    boot_addr = boot.wait_ready()
    common = ["--dp-size", "2", "--num-pages", "512"]
    workers = start_all([
        Proc("load-pa", ["prefill", "--instance-id", "pa", "--load-balance-method", "follow_bootstrap_room",
                         "--bootstrap-addr", boot_addr, *common]),
        Proc("load-pb", ["prefill", "--instance-id", "pb", "--load-balance-method", "round_robin",
                         "--bootstrap-addr", boot_addr, *common]),
        Proc("load-d", ["decode", "--instance-id", "d", *common]),
    ])
    pa, pb, d = workers
    router = Proc("load-router", ["router", "--port", "0", "--prefill", pa.address, "--prefill", pb.address,
                                  "--decode", d.address, "--max-in-flight", "2000", "--max-queued", "2000"]).start()
    router.wait_ready()
    procs = {"bootstrap": boot, "pa": pa, "pb": pb, "d": d, "router": router}
    yield {"procs": procs, "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    for p in procs.values():
        if p.alive():
            p.proc.terminate()
    for p in procs.values():
        p.stop()


def run(coro):
    return asyncio.run(coro)


async def cancel_mid_stream(client: RouterClient, prompt: str) -> str:
    stream = client.stream(prompt, max_new_tokens=200, ignore_eos=True, timeout=TIMEOUT_S)
    async for _ in stream:
        break  # the first token came: go away
    await stream.aclose()
    return "CANCELLED_BY_CLIENT"


async def conflict(channel: grpc.aio.Channel) -> str:
    room = 2 * secrets.randbits(60) + 1  # follow_bootstrap_room implies rank 1; pin rank 0
    req = worker_pb2.PrefillRequest(bootstrap_room=room, routed_dp_rank=0, transfer_token=secrets.token_bytes(16),
                                    prompt=worker_pb2.Prompt(text="conflict"))
    try:
        await worker_pb2_grpc.PrefillServiceStub(channel).Prefill(req, timeout=TIMEOUT_S)
    except grpc.aio.AioRpcError as err:
        e = PdmeshError.from_rpc_error(err)
        return f"{e.code.name}:{e.reason}"
    return "OK"


async def wave(mesh, tag: str):
    """One wave: returns (good outcomes, injected results) after every request ended."""
    procs = mesh["procs"]
    async with RouterClient(procs["router"].address) as client, \
            grpc.aio.insecure_channel(procs["pa"].address) as pa:
        await client.connect()  # the handshake must not queue behind the burst on this loop
        good = [request(client, f"{tag} {i}", max_new_tokens=MAX_NEW, timeout=TIMEOUT_S,
                        routed_dp_rank=(i % 2 if i % 3 == 0 else None)) for i in range(GOOD)]
        injected = ([request(client, [10**6, 1], max_new_tokens=MAX_NEW, timeout=TIMEOUT_S) for _ in range(INVALID)]
                    + [cancel_mid_stream(client, f"{tag} cancel {i}") for i in range(CANCELLED)]
                    + [conflict(pa) for _ in range(CONFLICTS)])
        results = await asyncio.gather(*good, *injected, return_exceptions=True)
    return results[:GOOD], results[GOOD:]


def pools_full(mesh) -> bool:
    return all(settled(mesh["procs"][n].address, 2) for n in ("pa", "pb", "d"))


def all_pids(mesh) -> dict[str, int]:
    pids = {}
    for name, proc in mesh["procs"].items():
        pids[name] = proc.pid
        for rank, pid in rank_pids(proc.pid).items():
            pids[f"{name}[{rank}]"] = pid
    return pids


def scrape(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not in the bootstrap's metrics"
    return float(match.group(1))


def check_wave(mesh, good, injected) -> collections.Counter:
    assert len(good) + len(injected) == WAVE  # count in == count out
    paths = collections.Counter()
    for o in good:
        assert not isinstance(o, BaseException), repr(o)  # every end is an Outcome: tokens or typed
        assert o.ok and len(o.tokens) >= 1, o.error
        paths[o.path] += 1
    invalid, cancels, conflicts = injected[:INVALID], injected[INVALID:INVALID + CANCELLED], injected[-CONFLICTS:]
    for o in invalid:
        assert not o.ok and (o.code, o.error.reason) == ("INVALID_ARGUMENT", "TOKEN_OUT_OF_VOCABULARY"), o.error
    assert cancels == ["CANCELLED_BY_CLIENT"] * CANCELLED
    assert conflicts == ["FAILED_PRECONDITION:FOLLOW_BOOTSTRAP_ROOM_CONFLICT"] * CONFLICTS
    # nothing leaks: every pool full, every rank idle, no room left in the registry
    assert wait_until(lambda: pools_full(mesh), 60, interval=0.5)
    assert wait_until(lambda: scrape(mesh["metrics"], "pdmesh_bootstrap_rooms") == 0, 10)
    assert scrape(mesh["metrics"], "pdmesh_bootstrap_waiters") == 0
    assert scrape(mesh["metrics"], "pdmesh_bootstrap_instances") == 2
    return paths


def test_a_thousand_requests_at_once_then_memory_stays_flat(mesh):
    started = time.monotonic()
    paths = check_wave(mesh, *run(wave(mesh, "first")))
    first_s = time.monotonic() - started
    assert {common_pb2.RANK_PATH_HINT, common_pb2.RANK_PATH_FAST_PATH, common_pb2.RANK_PATH_LOOKUP} <= set(paths)
    pids = all_pids(mesh)
    before = {name: rss_kib(pid) for name, pid in pids.items()}
    check_wave(mesh, *run(wave(mesh, "second")))
    grown = {name: rss_kib(pid) - before[name] for name, pid in pids.items()}
    print(f"wave 1: {first_s:.1f}s, paths {dict(paths)}; RssAnon growth in wave 2 (KiB): {grown}")
    suspects = {name for name, g in grown.items() if g >= RSS_SLACK_KIB}
    if suspects:
        # A leak grows with every wave; allocator noise (arenas, caches sized by the first peaks)
        # does not come back: a third identical wave tells them apart.
        mid = {name: rss_kib(pids[name]) for name in suspects}
        check_wave(mesh, *run(wave(mesh, "third")))
        again = {name: rss_kib(pids[name]) - mid[name] for name in suspects}
        print(f"RssAnon growth in wave 3 (KiB): {again}")
        assert all(g < RSS_SLACK_KIB // 2 for g in again.values()), (grown, again)
    assert all_pids(mesh) == pids  # no process died or was restarted under load


def test_drain_stops_new_work_finishes_the_rest_deregisters_and_exits(mesh):
    procs = mesh["procs"]
    pb = procs["pb"]
    # One room held on pb by the test itself: its prefill stays active until its decode comes, so
    # pb has work when told to drain whatever the machine's speed (the router's requests may all
    # have ended by then on a loaded machine).
    room, token = secrets.randbits(63) or 1, secrets.token_bytes(16)
    prompt = worker_pb2.Prompt(text="held through the drain")
    sampling = common_pb2.SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    held = worker_pb2.PrefillRequest(bootstrap_room=room, prompt=prompt, sampling=sampling,
                                     transfer_token=token)
    fetch = worker_pb2.DecodeRequest(bootstrap_room=room, prompt=prompt, sampling=sampling,
                                     transfer_token=token, prefill_instance_id="pb",
                                     prefill_bootstrap_address=procs["bootstrap"].address)

    async def go():
        async with RouterClient(procs["router"].address) as client, \
                grpc.aio.insecure_channel(pb.address) as channel, \
                grpc.aio.insecure_channel(procs["d"].address) as d_channel:
            await client.connect()
            held_call = asyncio.ensure_future(
                worker_pb2_grpc.PrefillServiceStub(channel).Prefill(held, timeout=TIMEOUT_S))
            first = [asyncio.create_task(request(client, f"drain {i}", max_new_tokens=MAX_NEW,
                                                 timeout=TIMEOUT_S)) for i in range(300)]
            stub = worker_pb2_grpc.InstanceServiceStub(channel)
            # until pb holds more than the held room (an event we can poll, bounded)
            for _ in range(200):
                status = await stub.GetInstanceStatus(worker_pb2.GetInstanceStatusRequest(), timeout=10)
                if sum(r.active_requests for r in status.ranks) >= 10:  # busy, not at its last one
                    break
                await asyncio.sleep(0.05)
            reply = await stub.Drain(worker_pb2.DrainRequest(), timeout=10)
            later = [asyncio.create_task(request(client, f"after drain {i}", max_new_tokens=MAX_NEW,
                                                 timeout=TIMEOUT_S)) for i in range(100)]
            decode = worker_pb2_grpc.DecodeServiceStub(d_channel).Decode(fetch, timeout=TIMEOUT_S)
            tokens = [t async for m in decode for t in m.token_ids]
            return (reply, await held_call, tokens, await asyncio.gather(*first),
                    await asyncio.gather(*later))
    reply, held_reply, held_tokens, first, later = run(go())
    assert reply.active_requests > 0  # it had work when told to drain (the held room at least)
    assert held_reply.prompt_tokens > 0 and len(held_tokens) == MAX_NEW  # pb finished what it held
    for o in first + later:
        assert o.ok, o.error  # nothing is lost: pb finished its own, the router sent the rest to pa
    assert any(o.prefill_instance == "pb" for o in first)  # pb finished what it held ...
    assert all(o.prefill_instance == "pa" for o in later)  # ... and took nothing new
    assert pb.proc.wait(30) == 0, pb.tail()  # it exited, cleanly
    assert wait_until(lambda: registered(procs["bootstrap"].address) == {"pa"}, 10)
    with grpc.insecure_channel(procs["router"].address) as channel:
        listed = router_pb2_grpc.RouterServiceStub(channel).ListInstances(router_pb2.ListInstancesRequest(), timeout=10)
    assert [i.healthy for i in listed.instances if i.instance_id == "pb"] == [False]
    assert settled(procs["pa"].address, 2) and settled(procs["d"].address, 2)


def registered(bootstrap: str) -> set[str]:
    from pdmesh.bootstrap.v1 import bootstrap_pb2, bootstrap_pb2_grpc
    with grpc.insecure_channel(bootstrap) as channel:
        reply = bootstrap_pb2_grpc.BootstrapServiceStub(channel).ListInstances(
            bootstrap_pb2.ListInstancesRequest(), timeout=10)
    return {i.instance_id for i in reply.instances}
