"""The whole mesh as the README starts it (`pdmesh up`), driven through the router.

One `pdmesh up` (tests/router/conftest.py) serves the package: bootstrap, router, a follow_bootstrap_room prefill (dp 2) and a
decode (dp 2), each a separate process. The engine is exact (float64, batch-invariant, one thread
per process), so the router's text must equal one colocated engine's.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from pdmesh.errors import PdmeshError
from pdmesh.router.client import RouterClient
from pdmesh.router.up import colocated_text
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc
from procs import Proc
from testkit.faultkit import wait_until

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
PROMPT = "Disaggregated serving splits prefill from decode"


def run(coro):
    return asyncio.run(coro)


async def generate(address: str, prompt=PROMPT, **kwargs):
    async with RouterClient(address) as client:
        return await client.generate(prompt, **kwargs)


def test_up_demo_said_the_text_matches(mesh):
    assert "same text as one colocated engine: yes" in "".join(mesh["up"].lines)


def test_grpcurl_and_python_client_return_the_colocated_text(mesh):
    expected = colocated_text(PROMPT, 12, model=None, preset="tiny")
    request = json.dumps({"prompt": {"text": PROMPT}, "sampling": {"max_new_tokens": 12}})
    out = subprocess.run([GRPCURL, "-plaintext", "-d", request, mesh["router"],
                          "pdmesh.router.v1.RouterService/Generate"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    messages = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00") if chunk.strip()]
    assert "".join(m.get("text", "") for m in messages) == expected
    routing = messages[0]["info"]["routing"]
    # follow_bootstrap_room: either rank path is the fast one (grpcurl omits zero-valued fields)
    assert routing["rank_path"] == "RANK_PATH_FAST_PATH", messages[0]
    sample = run(generate(mesh["router"], max_new_tokens=12))
    assert sample.text == expected
    assert sample.finish_reason in ("FINISH_REASON_LENGTH", "FINISH_REASON_EOS")


def test_mixed_routing_through_the_router_all_succeeds(mesh):
    async def many():
        async with RouterClient(mesh["router"]) as client:
            jobs = [client.generate(f"{PROMPT} #{i}", max_new_tokens=6,
                                    routed_dp_rank=(i % 2 if i % 3 else None)) for i in range(12)]
            return await asyncio.gather(*jobs)
    samples = run(many())
    paths = {s.rank_path for s in samples}
    assert paths == {"hint", "fast_path"}
    for i, s in enumerate(samples):
        assert s.text == colocated_text(f"{PROMPT} #{i}", 6, model=None, preset="tiny")
        if i % 3:
            assert s.info.routing.prefill_dp_rank == i % 2


def test_the_same_pinned_request_straight_to_the_prefill_is_a_conflict(mesh):
    stub = worker_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(mesh["prefill"]))
    room = 2 * 4242 + 1  # follow_bootstrap_room implies rank 1
    request = worker_pb2.PrefillRequest(bootstrap_room=room, routed_dp_rank=0, transfer_token=b"k" * 16,
                                        prompt=worker_pb2.Prompt(text=PROMPT))
    with pytest.raises(grpc.RpcError) as err:
        stub.Prefill(request, timeout=20)
    typed = PdmeshError.from_rpc_error(err.value)
    assert (typed.code, typed.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "FOLLOW_BOOTSTRAP_ROOM_CONFLICT")


def test_n_samples_use_distinct_rooms(mesh):
    async def go():
        async with RouterClient(mesh["router"]) as client:
            return await client.generate_samples(PROMPT, n=4, max_new_tokens=4)
    samples = run(go())
    assert len(samples) == 4
    assert len({s.info.bootstrap_room for s in samples}) == 4
    assert len({s.text for s in samples}) == 1  # greedy: same text, separate rooms


def test_worker_status_reaches_the_client_unchanged(mesh):
    with pytest.raises(PdmeshError) as err:
        run(generate(mesh["router"], prompt=[10**6], max_new_tokens=2))
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TOKEN_OUT_OF_VOCABULARY")
    with pytest.raises(PdmeshError) as err:
        run(generate(mesh["router"], routed_dp_rank=5))
    assert err.value.reason == "DP_RANK_OUT_OF_RANGE"


def pools_full(address: str) -> bool:
    stub = worker_pb2_grpc.InstanceServiceStub(grpc.insecure_channel(address))
    status = stub.GetInstanceStatus(worker_pb2.GetInstanceStatusRequest(), timeout=10)
    return all(r.free_pages == r.total_pages and r.active_requests == 0 for r in status.ranks)



def test_a_cancelled_stream_frees_pages_on_both_sides(mesh):
    async def cancel_midway():
        async with RouterClient(mesh["router"]) as client:
            stream = client.stream(PROMPT, max_new_tokens=400, ignore_eos=True)
            async for _ in stream:
                break  # first tokens arrived: the decode holds pages; now go away
            await stream.aclose()
    run(cancel_midway())
    assert wait_until(lambda: pools_full(mesh["prefill"]) and pools_full(mesh["decode"]), 10)


def test_admission_refuses_with_retry_info_beyond_the_queue(mesh):
    router = Proc("small-router", ["router", "--port", "0", "--prefill", mesh["prefill"], "--decode",
                                   mesh["decode"], "--max-in-flight", "1", "--max-queued", "0"]).start()
    try:
        address = router.wait_ready()

        async def burst():
            async with RouterClient(address) as client:
                jobs = [client.generate(PROMPT, max_new_tokens=40, ignore_eos=True) for _ in range(4)]
                return await asyncio.gather(*jobs, return_exceptions=True)
        results = run(burst())
        refused = [r for r in results if isinstance(r, PdmeshError)]
        assert refused and all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
        assert all(r.reason == "ROUTER_AT_CAPACITY" and r.retry_after_s for r in refused)
        assert any(not isinstance(r, Exception) for r in results)
    finally:
        router.stop()
