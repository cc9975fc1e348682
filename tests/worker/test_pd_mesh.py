"""A prefill and a decode instance, real processes on loopback, called directly (no router).

One mesh serves the whole module: a bootstrap service; four prefills (dp 2 follow_bootstrap_room,
dp 2 follow_bootstrap_room with force-query, dp 1, dp 1 without layer streaming); one decode
(dp 2). Exactness: the engine is
the `tiny` preset, float64 and batch-invariant (each sequence of a decode batch goes through the
model alone, so batching cannot change summation order), with one torch thread in every process:
the PD output must equal one colocated engine's token for token, and the KV the decode received
must be bit-identical to the colocated prefill's (decode ranks dump it under
PDMESH_DEBUG_KV_DIR for this test).
"""

from __future__ import annotations

import concurrent.futures
import secrets
import time
from pathlib import Path

import grpc
import pytest
import torch

from pdmesh.bootstrap.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from pdmesh.common.v1 import common_pb2
from pdmesh.errors import PdmeshError
from pdmesh.worker.engine.factory import EngineSpec, build_engine
from pdmesh.worker.engine.reference import colocated_generate
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc
from procs import Proc, start_all, stop_all

PROMPTS = [f"prompt {i}: the quick brown fox {'jumps ' * (i % 5)}over the lazy dog" for i in range(12)]
MAX_NEW = 12


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kv")


@pytest.fixture(scope="module")
def mesh(kv_dir):
    boot = Proc("bootstrap", ["bootstrap", "--port", "0"]).start()
    boot_addr = boot.wait_ready()
    common = ["--num-pages", "256", "--bootstrap-addr", boot_addr]
    procs = start_all([
        Proc("prefill-follow", ["prefill", "--instance-id", "p-follow", "--dp-size", "2",
                                "--load-balance-method", "follow_bootstrap_room", *common]),
        Proc("prefill-force", ["prefill", "--instance-id", "p-force", "--dp-size", "2",
                               "--load-balance-method", "follow_bootstrap_room", *common],
             env={"PDMESH_FORCE_QUERY_PREFILL_DP_RANK": "1"}),
        Proc("prefill-dp1", ["prefill", "--instance-id", "p-dp1", "--dp-size", "1", *common]),
        Proc("prefill-nostream", ["prefill", "--instance-id", "p-nostream", "--dp-size", "1", *common],
             env={"PDMESH_LAYER_STREAMING": "0"}),
        Proc("decode", ["decode", "--instance-id", "d-0", "--dp-size", "2", "--num-pages", "256"],
             env={"PDMESH_DEBUG_KV_DIR": str(kv_dir)}),
        # 8 pages of 16 tokens: a pool that fills up.
        Proc("decode-small", ["decode", "--instance-id", "d-small", "--dp-size", "1", "--num-pages", "8"],
             env={"PDMESH_PAGE_WAIT_S": "20"}),
    ])
    channels = {p.name: grpc.insecure_channel(p.address) for p in procs}
    yield {"bootstrap": boot_addr, "procs": {p.name: p for p in procs}, "channels": channels}
    for ch in channels.values():
        ch.close()
    stop_all([*procs, boot])


@pytest.fixture(scope="module")
def engine():
    return build_engine(EngineSpec())


def call_pair(mesh, prefill: str, prompt: str, *, room: int | None = None, routed: int | None = None,
              hint: int | None = None, max_new: int = MAX_NEW, decode: str = "decode", ignore_eos=False):
    """Send one room to a prefill and the decode at once; return (prefill reply, decode messages)."""
    room = room or secrets.randbits(63) or 1
    token = secrets.token_bytes(16)
    sampling = common_pb2.SamplingParams(max_new_tokens=max_new, ignore_eos=ignore_eos)
    p_req = worker_pb2.PrefillRequest(bootstrap_room=room, prompt=worker_pb2.Prompt(text=prompt),
                                      sampling=sampling, transfer_token=token)
    d_req = worker_pb2.DecodeRequest(bootstrap_room=room, prompt=worker_pb2.Prompt(text=prompt),
                                     sampling=sampling, prefill_instance_id=f"p-{prefill.split('-', 1)[1]}",
                                     prefill_bootstrap_address=mesh["bootstrap"], transfer_token=token)
    if routed is not None:
        p_req.routed_dp_rank = routed
    if hint is not None:
        p_req.disagg_prefill_dp_rank = hint
        d_req.disagg_prefill_dp_rank = hint
    p_stub = worker_pb2_grpc.PrefillServiceStub(mesh["channels"][prefill])
    d_stub = worker_pb2_grpc.DecodeServiceStub(mesh["channels"][decode])
    p_future = p_stub.Prefill.future(p_req, timeout=60)
    d_call = d_stub.Decode(d_req, timeout=60)
    p_future.add_done_callback(lambda f: f.exception() is not None and d_call.cancel())
    try:
        messages = list(d_call)
    except grpc.RpcError as err:
        if p_future.done() and p_future.exception() is not None:  # the prefill failed first
            raise PdmeshError.from_rpc_error(p_future.exception()) from None
        # the decode failed first: abort the prefill's room, as the router does
        worker_pb2_grpc.InstanceServiceStub(mesh["channels"][prefill]).AbortRoom(
            worker_pb2.AbortRoomRequest(bootstrap_room=room, reason="test: decode failed"), timeout=10)
        raise PdmeshError.from_rpc_error(err) from None
    return room, p_future.result(), messages


def tokens_of(messages) -> list[int]:
    return [t for m in messages for t in m.token_ids]


def test_concurrent_prompts_equal_colocated_engine_and_kv_is_bit_identical(mesh, engine, kv_dir):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: call_pair(mesh, "prefill-follow", p), PROMPTS))
    for prompt, (room, reply, messages) in zip(PROMPTS, results):
        ids = engine.tokenizer.encode(prompt)
        ref = colocated_generate(engine, ids, MAX_NEW)
        assert tokens_of(messages) == list(ref.output_ids), prompt
        assert "".join(m.text for m in messages) == engine.tokenizer.decode(ref.output_ids)
        assert reply.first_token_id == ref.output_ids[0]
        received = torch.load(kv_dir / f"{room}.pt")
        assert torch.equal(received, ref.prompt_kv), "decode's KV differs from the colocated prefill's"
        assert messages[0].routing.rank_path == common_pb2.RANK_PATH_FAST_PATH
        assert messages[0].routing.prefill_dp_rank == room % 2 == reply.dp_rank


def test_layer_streaming_on_and_off_equal_the_colocated_engine_bit_for_bit(mesh, engine, kv_dir):
    """Layer streaming (the default: the room is offered before compute and each layer's KV
    leaves once final, here with the decode's request racing the compute) and without it
    (PDMESH_LAYER_STREAMING=0): the same tokens as one colocated engine, the same KV bits."""
    prompts = [f"stream {i}: " + "a long prompt of many pages " * (3 + 4 * i) for i in range(3)]
    for prefill in ("prefill-dp1", "prefill-nostream"):
        for prompt in prompts:
            room, reply, messages = call_pair(mesh, prefill, prompt)
            ref = colocated_generate(engine, engine.tokenizer.encode(prompt), MAX_NEW)
            assert tokens_of(messages) == list(ref.output_ids), (prefill, prompt)
            assert reply.first_token_id == ref.output_ids[0]
            assert torch.equal(torch.load(kv_dir / f"{room}.pt"), ref.prompt_kv), prefill


def test_every_rank_path(mesh, engine):
    _, reply, msgs = call_pair(mesh, "prefill-follow", "hinted", routed=1, hint=1, room=2 * 12345)
    assert (reply.rank_path, msgs[0].routing.rank_path, reply.dp_rank) == (
        common_pb2.RANK_PATH_HINT, common_pb2.RANK_PATH_HINT, 1)
    _, reply, msgs = call_pair(mesh, "prefill-dp1", "one rank")
    assert msgs[0].routing.rank_path == common_pb2.RANK_PATH_DP1 and reply.dp_rank == 0
    _, reply, msgs = call_pair(mesh, "prefill-force", "force query")
    assert reply.rank_path == msgs[0].routing.rank_path == common_pb2.RANK_PATH_LOOKUP
    assert msgs[0].routing.prefill_dp_rank == reply.dp_rank
    _, reply, msgs = call_pair(mesh, "prefill-follow", "fast path")
    assert msgs[0].routing.rank_path == common_pb2.RANK_PATH_FAST_PATH


def test_pinned_rank_on_follow_bootstrap_room_is_a_typed_conflict(mesh):
    room = 2 * 777 + 1  # implies rank 1
    with pytest.raises(PdmeshError) as err:
        call_pair(mesh, "prefill-follow", "conflict", room=room, routed=0)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.reason == "FOLLOW_BOOTSTRAP_ROOM_CONFLICT"
    assert err.value.metadata["implied_dp_rank"] == "1" and err.value.metadata["dispatched_dp_rank"] == "0"
    assert "PDMESH_FORCE_QUERY_PREFILL_DP_RANK=1" in err.value.message


def test_force_query_lets_the_pinned_request_through(mesh, engine):
    room = 2 * 778 + 1
    _, reply, msgs = call_pair(mesh, "prefill-force", "conflict", room=room, routed=0)
    assert reply.dp_rank == 0 and msgs[0].routing.prefill_dp_rank == 0
    assert msgs[0].routing.rank_path == common_pb2.RANK_PATH_LOOKUP
    ref = colocated_generate(engine, engine.tokenizer.encode("conflict"), MAX_NEW)
    assert tokens_of(msgs) == list(ref.output_ids)


def test_a_registration_refused_stops_the_prefill_typed_and_promptly(mesh):
    # The room is registered while its pages compute; a refused registration must end the request
    # with its own status at once, not after the 30 s an unclaimed room waits for its decode.
    room = 2 * 779 + 1
    bootstrap = grpc.insecure_channel(mesh["bootstrap"])
    bootstrap_pb2_grpc.BootstrapServiceStub(bootstrap).RegisterRoom(bootstrap_pb2.RegisterRoomRequest(
        instance_id="p-force", bootstrap_room=room, dp_rank=1, request_id="another-request"), timeout=10)
    bootstrap.close()
    stub = worker_pb2_grpc.PrefillServiceStub(mesh["channels"]["prefill-force"])
    request = worker_pb2.PrefillRequest(bootstrap_room=room, routed_dp_rank=0, transfer_token=b"t" * 16,
                                        prompt=worker_pb2.Prompt(text="refused " * 20))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Prefill(request, timeout=60)
    typed = PdmeshError.from_rpc_error(err.value)
    assert (typed.code, typed.reason) == (grpc.StatusCode.ALREADY_EXISTS, "ROOM_ALREADY_REGISTERED")
    assert time.monotonic() - started < 20


def test_bad_input_is_invalid_argument(mesh):
    stub = worker_pb2_grpc.PrefillServiceStub(mesh["channels"]["prefill-follow"])
    for request in (worker_pb2.PrefillRequest(bootstrap_room=0, prompt=worker_pb2.Prompt(text="x"),
                                              transfer_token=b"t" * 16),
                    worker_pb2.PrefillRequest(bootstrap_room=5, prompt=worker_pb2.Prompt(text="x"),
                                              transfer_token=b"short"),
                    worker_pb2.PrefillRequest(bootstrap_room=5, routed_dp_rank=7,
                                              prompt=worker_pb2.Prompt(text="x"), transfer_token=b"t" * 16)):
        with pytest.raises(grpc.RpcError) as err:
            stub.Prefill(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_full_decode_pool_waits_then_serves_and_never_shares_pages(mesh, engine):
    # Each request needs 5 prompt pages + growth of 16 tokens (one more page) in a pool of 8:
    # the second waits for the first to finish, then both produce the colocated text.
    prompt = "x" * 70  # 71 tokens with BOS: 5 pages
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: call_pair(mesh, "prefill-dp1", prompt, max_new=16,
                                                    decode="decode-small", ignore_eos=True), range(2)))
    ref = colocated_generate(engine, engine.tokenizer.encode(prompt), 16, stop_on_eos=False)
    for _, _, messages in results:
        assert tokens_of(messages) == list(ref.output_ids)


def test_a_sequence_that_outgrows_the_pool_is_preempted_typed(mesh):
    # 71 prompt tokens (5 pages) + 100 new tokens needs 11 pages of 8: preempted, pages returned.
    with pytest.raises(PdmeshError) as err:
        call_pair(mesh, "prefill-dp1", "y" * 70, max_new=100, decode="decode-small", ignore_eos=True)
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "KV_POOL_EXHAUSTED")


def test_a_request_larger_than_the_pool_is_refused_at_once(mesh):
    with pytest.raises(PdmeshError) as err:
        call_pair(mesh, "prefill-dp1", "z" * 200, max_new=2, decode="decode-small")
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "REQUEST_LARGER_THAN_POOL")


def test_pools_are_full_afterwards(mesh):
    # A prefill whose decode failed holds its room until the abort reaches it or, when the
    # abort raced ahead of the request, until its transfer wait (30 s) ends: bounded, not a leak.
    def full(name: str):
        stub = worker_pb2_grpc.InstanceServiceStub(mesh["channels"][name])
        status = stub.GetInstanceStatus(worker_pb2.GetInstanceStatusRequest(), timeout=10)
        return all(r.alive and r.free_pages == r.total_pages for r in status.ranks), status
    for name in ("prefill-follow", "prefill-force", "prefill-dp1", "prefill-nostream", "decode",
                 "decode-small"):
        deadline = time.monotonic() + 45
        ok, status = full(name)
        while not ok and time.monotonic() < deadline:
            time.sleep(0.2)
            ok, status = full(name)
        assert ok, (name, status)
        # role and method travel as the proto enums (issue 12), not as strings
        role = common_pb2.INSTANCE_ROLE_PREFILL if name.startswith("prefill") else common_pb2.INSTANCE_ROLE_DECODE
        assert status.role == role, (name, status)
        if name in ("prefill-follow", "prefill-force"):
            assert status.load_balance_method == common_pb2.LOAD_BALANCE_METHOD_FOLLOW_BOOTSTRAP_ROOM, status
