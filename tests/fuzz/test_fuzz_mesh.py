"""Bad input against every RPC of a real mesh (`pdmesh up`: bootstrap, router, prefill dp 2,
decode dp 2, each its own process), with hypothesis.

Each test draws batches of requests (fuzz_messages: absurd fields, damaged encodings, noise),
sends each batch at once as raw bytes and checks every outcome (fuzz_oracle: OK or a typed
status with a pdmesh ErrorInfo; INVALID_ARGUMENT where the input is certainly bad; the client's
own deadline only for inputs that may wait). What a call created (an instance, a room, a router
entry) is removed right after. The last test checks that every service is still healthy: health
SERVING, no rank restarted, pools full, no leftover registration, a normal request works, and
no process logged an exception. `PDMESH_FUZZ_BASE_PORT=<port>` runs the tests against a
`pdmesh up --base-port <port>` that is already running instead of starting one.
Examples are derandomized (fixed per test), so CI sees the same inputs every run.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from google.rpc import error_details_pb2

from pdmesh.bootstrap.v1 import bootstrap_pb2 as bpb
from pdmesh.common.v1 import common_pb2 as cpb
from pdmesh.reasons import Reason
from pdmesh.router.v1 import router_pb2 as rpb
from pdmesh.worker.v1 import worker_pb2 as wpb
import fuzz_messages as fm
from fuzz_mesh import BOOTSTRAP, DECODE, INSTANCE, PREFILL, PREFILL_ID, ROUTER, Mesh, expect_all
from fuzz_oracle import C, MALFORMED, UNTYPED_CODES, Expect, check, count, summary
from fuzz_transfer import RawPeer, exchange, transfer_messages
from fuzz_wire import LoopThread

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))


def batches(strategy, size: int = 12):
    return st.lists(strategy, min_size=1, max_size=size)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    loop = LoopThread()
    mesh = Mesh(loop, str(tmp_path_factory.mktemp("fuzz-up-logs")))
    yield mesh
    code = mesh.stop()
    loop.close()
    assert code == 0, mesh.up and mesh.up.tail()


# ---- bootstrap -------------------------------------------------------------------------------

@settings(FUZZ, max_examples=60)
@given(batch=batches(fm.register_instance_requests()))
def test_bootstrap_register_instance(mesh, batch):
    async def forget(data, out):
        if out.ok:  # a good fake instance was published: take it back
            info = bpb.RegisterInstanceRequest.FromString(data).info
            await mesh.callers["bootstrap"].unary(BOOTSTRAP + "DeregisterInstance", bpb.DeregisterInstanceRequest(
                instance_id=info.instance_id).SerializeToString(), 10)
    mesh.fuzz("bootstrap.RegisterInstance", "bootstrap", BOOTSTRAP + "RegisterInstance",
              bpb.RegisterInstanceRequest, fm.register_instance_model, batch,
              skip=lambda m: m.info.instance_id == PREFILL_ID, after=forget)


@pytest.mark.parametrize("rpc,request_type", [
    ("DeregisterInstance", bpb.DeregisterInstanceRequest), ("HeartbeatInstance", bpb.HeartbeatInstanceRequest),
    ("GetInstance", bpb.GetInstanceRequest)])
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_bootstrap_instance_by_id(mesh, rpc, request_type, data):
    batch = data.draw(batches(fm.by_id_requests(request_type)))
    mesh.fuzz(f"bootstrap.{rpc}", "bootstrap", BOOTSTRAP + rpc, request_type, fm.by_id_model, batch,
              skip=lambda m: m.instance_id == PREFILL_ID and rpc == "DeregisterInstance")


@settings(FUZZ, max_examples=50)
@given(batch=batches(fm.register_room_requests([PREFILL_ID])))
def test_bootstrap_register_room(mesh, batch):
    async def forget(data, out):
        if out.ok:
            room = bpb.RegisterRoomRequest.FromString(data).bootstrap_room
            await mesh.callers["bootstrap"].unary(BOOTSTRAP + "RemoveRoom", bpb.RemoveRoomRequest(
                bootstrap_room=room).SerializeToString(), 10)
    mesh.fuzz("bootstrap.RegisterRoom", "bootstrap", BOOTSTRAP + "RegisterRoom", bpb.RegisterRoomRequest,
              fm.register_room_model, batch, after=forget)


@settings(FUZZ, max_examples=35)
@given(lookups=batches(fm.lookup_room_requests()), removals=batches(fm.remove_room_requests()),
       lists=batches(st.binary(max_size=40), 6))
def test_bootstrap_lookup_remove_and_list(mesh, lookups, removals, lists):
    mesh.fuzz("bootstrap.LookupRoom", "bootstrap", BOOTSTRAP + "LookupRoom", bpb.LookupRoomRequest,
              fm.lookup_room_model, lookups, wait_s=0.4)
    mesh.fuzz("bootstrap.RemoveRoom", "bootstrap", BOOTSTRAP + "RemoveRoom", bpb.RemoveRoomRequest,
              fm.remove_room_model, removals)
    mesh.fuzz("bootstrap.ListInstances", "bootstrap", BOOTSTRAP + "ListInstances", bpb.ListInstancesRequest,
              expect_all(fm.OK_ONLY), lists)


def watch_model(messages: list[bytes]) -> tuple[Expect, list[bpb.WatchRoomsRequest]]:
    parsed = []
    for data in messages:
        try:
            parsed.append(bpb.WatchRoomsRequest.FromString(data))
        except Exception:  # noqa: BLE001 - the stream ends at this message
            return MALFORMED, parsed
    waits = any(m.wait_bootstrap_rooms and not 0 < m.wait_timeout_ms <= 1000 for m in parsed)
    return Expect(frozenset({C.OK}), may_wait=waits), parsed


@settings(FUZZ, max_examples=30)
@given(streams=st.lists(fm.watch_streams(), min_size=1, max_size=4))
def test_bootstrap_watch_rooms_stream(mesh, streams):
    """Each stream: every tagged request answered exactly once, with its tag."""
    async def one():
        models = [watch_model(s) for s in streams]
        timeouts = [0.5 if e.may_wait else 20.0 for e, _ in models]
        outs = await asyncio.gather(*(mesh.invoke("bootstrap", BOOTSTRAP + "WatchRooms", s, t)
                                      for s, t in zip(streams, timeouts)))
        for (expect, parsed), out, timeout in zip(models, outs, timeouts):
            check("bootstrap.WatchRooms (messages)", expect, out, timeout, parsed)
            sent = Counter(m.tag for m in parsed if m.tag)
            got = Counter(r.tag for r in map(bpb.WatchRoomsResponse.FromString, out.responses) if r.tag)
            assert got == sent if out.ok else not got - sent, (sent, got, out)
    mesh.run(one())


def register_stream_model(messages: list[bytes]) -> tuple[Expect, list[bpb.RegisterRoomsStreamRequest]]:
    parsed = []
    for data in messages:
        try:
            parsed.append(bpb.RegisterRoomsStreamRequest.FromString(data))
        except Exception:  # noqa: BLE001 - the stream ends at this message
            return MALFORMED, parsed
    return Expect(frozenset({C.OK})), parsed


def check_registration_results(request: bpb.RegisterRoomsStreamRequest,
                               response: bpb.RegisterRoomsStreamResponse) -> list[int]:
    """One typed result per registration (INVALID_ARGUMENT where the model knows the input is
    bad); returns the rooms registered (to remove them)."""
    assert len(response.results) == len(request.registrations), (request, response)
    registered = []
    for item, result in zip(request.registrations, response.results):
        assert result.bootstrap_room == item.bootstrap_room
        expect = fm.register_room_model(item)
        if not result.HasField("status"):
            assert expect.codes is None, f"bad registration accepted: {item}"
            registered.append(item.bootstrap_room)
            count("bootstrap.RegisterRoomsStream (registrations)", "OK")
            continue
        code = next(c for c in C if c.value[0] == result.status.code)
        info = error_details_pb2.ErrorInfo()
        assert result.status.details and result.status.details[0].Unpack(info), result
        assert info.domain == "pdmesh" and info.reason and code not in UNTYPED_CODES, result
        assert expect.codes is None or code in expect.codes, (item, result)
        count("bootstrap.RegisterRoomsStream (registrations)", f"{code.name}/{info.reason}")
    return registered


@settings(FUZZ, max_examples=30)
@given(streams=st.lists(fm.register_stream_streams([PREFILL_ID]), min_size=1, max_size=4))
def test_bootstrap_register_rooms_stream(mesh, streams):
    """Each stream: every request answered once, with its tag, one typed result per registration;
    a bad registration fails alone and the stream goes on."""
    async def one():
        models = [register_stream_model(s) for s in streams]
        outs = await asyncio.gather(*(mesh.invoke("bootstrap", BOOTSTRAP + "RegisterRoomsStream", s, 20.0)
                                      for s in streams))
        registered = []
        for (expect, parsed), out in zip(models, outs):
            check("bootstrap.RegisterRoomsStream (messages)", expect, out, 20.0, parsed)
            responses = [bpb.RegisterRoomsStreamResponse.FromString(r) for r in out.responses]
            assert len(responses) == len(parsed) if out.ok else len(responses) <= len(parsed)
            for request, response in zip(parsed, responses):
                assert response.tag == request.tag
                registered += check_registration_results(request, response)
        for room in set(registered):
            await mesh.callers["bootstrap"].unary(BOOTSTRAP + "RemoveRoom", bpb.RemoveRoomRequest(
                bootstrap_room=room).SerializeToString(), 10)
    mesh.run(one())


# ---- workers (on their controllers) -------------------------------------------------------------

@settings(FUZZ, max_examples=40)
@given(batch=batches(fm.prefill_requests()))
def test_prefill(mesh, batch):
    mesh.fuzz("prefill.Prefill", "prefill", PREFILL + "Prefill", wpb.PrefillRequest, fm.prefill_model, batch)


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_decode(mesh, data):
    strategy = fm.decode_requests([PREFILL_ID], [mesh.address["bootstrap"]])
    mesh.fuzz("decode.Decode", "decode", DECODE + "Decode", wpb.DecodeRequest, fm.decode_model,
              data.draw(batches(strategy)))


@pytest.mark.parametrize("role", ["prefill", "decode"])
@settings(FUZZ, max_examples=30)
@given(aborts=batches(fm.abort_requests()), statuses=batches(st.binary(max_size=40), 4),
       drains=batches(st.binary(min_size=1, max_size=40).filter(
           lambda b: not _parses(wpb.DrainRequest, b)), 4))
def test_controller_instance_service(mesh, role, aborts, statuses, drains):
    mesh.fuzz(f"{role}.AbortRoom", role, INSTANCE + "AbortRoom", wpb.AbortRoomRequest, fm.abort_model, aborts)
    mesh.fuzz(f"{role}.GetInstanceStatus", role, INSTANCE + "GetInstanceStatus", wpb.GetInstanceStatusRequest,
              expect_all(fm.OK_ONLY), statuses)
    # A DrainRequest that parses would drain the mesh's instance: only undecodable bytes go.
    mesh.fuzz(f"{role}.Drain (undecodable)", role, INSTANCE + "Drain", wpb.DrainRequest,
              expect_all(MALFORMED), drains)


def _parses(request_type, data: bytes) -> bool:
    try:
        request_type.FromString(data)
    except Exception:  # noqa: BLE001
        return False
    return True


# ---- router ------------------------------------------------------------------------------------

@settings(FUZZ, max_examples=20)
@given(batch=batches(fm.generate_requests(), 8))
def test_router_generate(mesh, batch):
    mesh.fuzz("router.Generate", "router", ROUTER + "Generate", rpb.GenerateRequest, fm.generate_model,
              batch, wait_s=3.0, timeout_s=60.0)


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_router_admin(mesh, data):
    real = {mesh.address["prefill"], mesh.address["decode"]}
    ports = [a.rsplit(":", 1)[1] for a in mesh.address.values()]
    aliases = [f"{host}:{port}" for host in ("localhost", "127.0.0.1", "[::1]") for port in ports]

    async def take_back(data, out):
        if out.ok and (address := rpb.AddInstanceRequest.FromString(data).instance.address) not in real:
            await mesh.callers["router"].unary(ROUTER + "RemoveInstance", rpb.RemoveInstanceRequest(
                address=address).SerializeToString(), 10)
    mesh.fuzz("router.AddInstance", "router", ROUTER + "AddInstance", rpb.AddInstanceRequest,
              fm.add_instance_model, data.draw(batches(fm.add_instance_requests(aliases), 6)), after=take_back)
    removals = data.draw(batches(fm.wire(st.builds(rpb.RemoveInstanceRequest, address=fm.ADDRESSES)), 6))
    mesh.fuzz("router.RemoveInstance", "router", ROUTER + "RemoveInstance", rpb.RemoveInstanceRequest,
              expect_all(Expect(frozenset({C.NOT_FOUND}))), removals, skip=lambda m: m.address in real)
    mesh.fuzz("router.ListInstances", "router", ROUTER + "ListInstances", rpb.ListInstancesRequest,
              expect_all(fm.OK_ONLY), data.draw(batches(st.binary(max_size=40), 4)))


# ---- the data plane through the mesh -----------------------------------------------------------

FAKE_IDS = itertools.count(1)  # fake prefill instances, one id each (decodes cache info by id)
# Transfer addresses the bootstrap accepts (host:port) that are no UCX listener.
UCX_ADDRESSES = st.one_of(st.sampled_from([
    "ucx://127.0.0.1:1", "127.0.0.1:1", "ucx://:1", "ucx://a b:9", "ucx://[::1]:1", "ucx://::1:1",
    "ucx://nonexistent.invalid:1", "ucx://0.0.0.0:1", "ucx://ucx://127.0.0.1:1", "ucx://h\x00:1",
    "ucx://" + "a" * 250 + ":1", "tcp://127.0.0.1:1", "ucx://127.0.0.1:65535"]),
    st.tuples(fm.TEXT, st.integers(1, 65535)).map(lambda t: f"ucx://{t[0]}:{t[1]}"))


@settings(FUZZ, max_examples=15)
@given(addresses=st.lists(UCX_ADDRESSES, min_size=1, max_size=4))
def test_decode_fetching_from_malformed_transfer_addresses_fails_typed(mesh, addresses):
    """A prefill whose published transfer address is no UCX listener: the decode fails typed."""
    ids = []
    for address in addresses:
        n = next(FAKE_IDS)
        info = bpb.InstanceInfo()
        info.CopyFrom(mesh.prefill_info)
        info.instance_id, info.epoch, info.dp_size = f"fuzz-ucx-{n}", 1, 1
        del info.rank_endpoints[:]
        info.rank_endpoints.add(dp_rank=0, transfer_address=address)
        out = mesh.run(mesh.callers["bootstrap"].unary(BOOTSTRAP + "RegisterInstance", bpb.RegisterInstanceRequest(
            info=info).SerializeToString(), 10))
        if out.ok:
            ids.append(info.instance_id)
    requests = [wpb.DecodeRequest(bootstrap_room=1000 + i, prompt=wpb.Prompt(text="hi"), transfer_token=b"k" * 16,
                                  prefill_instance_id=i_d, prefill_bootstrap_address=mesh.address["bootstrap"]
                                  ).SerializeToString() for i, i_d in enumerate(ids)]
    refused = Expect(frozenset({C.UNAVAILABLE, C.DEADLINE_EXCEEDED, C.INVALID_ARGUMENT}), may_wait=True)
    mesh.fuzz("decode.Decode (malformed transfer address)", "decode", DECODE + "Decode", wpb.DecodeRequest,
              expect_all(refused), requests, wait_s=15.0)
    for i_d in ids:
        mesh.run(mesh.callers["bootstrap"].unary(BOOTSTRAP + "DeregisterInstance", bpb.DeregisterInstanceRequest(
            instance_id=i_d).SerializeToString(), 10))


@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_prefill_rank_sender_answers_malformed_transfer_messages(mesh, data):
    """Raw control messages to the mesh's prefill ranks over UCX: typed answers, links survive."""
    layout = mesh.prefill_info.kv_layout
    messages = data.draw(st.lists(transfer_messages(12345, b"x" * 16, layout), min_size=1, max_size=10))
    rank = data.draw(st.sampled_from(list(mesh.prefill_info.rank_endpoints)))

    async def one():
        if not hasattr(mesh, "transport"):
            from pdmesh.worker.transfer.ucx import UcxTransport
            mesh.transport, mesh.peers = UcxTransport(), {}
        if rank.dp_rank not in mesh.peers:
            mesh.peers[rank.dp_rank] = await RawPeer.connect(mesh.transport, rank.transfer_address)
        # every request is aborted at once: the rank holds no room, so none may be accepted
        await exchange(mesh.peers[rank.dp_rank], messages, [True] * len(messages), 8.0, lambda q: False,
                       "prefill rank KvSender (TransferMessage)")
    mesh.run(one())


# ---- inputs that once crashed, hung or came back untyped (regressions) --------------------------

def _info_with_port(port: str) -> bytes:
    info = bpb.InstanceInfo(instance_id="fuzz-digits", epoch=1, dp_size=1, tp_size=1, pp_size=1,
                            load_balance_method=1, kv_layout=fm.cpb.KvLayout(
                                num_layers=1, page_size=1, num_kv_heads=1, head_dim=1, dtype=1))
    info.rank_endpoints.add(dp_rank=0, transfer_address="h:" + port)
    return bpb.RegisterInstanceRequest(info=info).SerializeToString()


KNOWN = [  # (service, method, request type, bytes, expected code, expected reason)
    # "²".isdigit() but int("²") raised: INTERNAL
    ("bootstrap", BOOTSTRAP + "RegisterInstance", bpb.RegisterInstanceRequest, _info_with_port("²"),
     C.INVALID_ARGUMENT, "INVALID_INSTANCE_INFO"),
    # the status echoed the 200 000-character id: trailers over the limit, a bare RESOURCE_EXHAUSTED
    ("bootstrap", BOOTSTRAP + "GetInstance", bpb.GetInstanceRequest,
     bpb.GetInstanceRequest(instance_id="z" * 200_000).SerializeToString(), C.INVALID_ARGUMENT,
     "INVALID_INSTANCE_ID"),
    # undecodable bytes: grpc's bare UNKNOWN
    ("bootstrap", BOOTSTRAP + "LookupRoom", bpb.LookupRoomRequest, b"\xff\xff", C.INVALID_ARGUMENT,
     "MALFORMED_REQUEST"),
    # room 0 was "not found", quietly
    ("prefill", INSTANCE + "AbortRoom", wpb.AbortRoomRequest, b"", C.INVALID_ARGUMENT, "INVALID_BOOTSTRAP_ROOM"),
    # a NaN temperature was checked only after the KV transfer (here: never, the decode waited)
    ("decode", DECODE + "Decode", wpb.DecodeRequest, wpb.DecodeRequest(
        bootstrap_room=7, prompt=wpb.Prompt(text="x"), transfer_token=b"k" * 16, prefill_instance_id=PREFILL_ID,
        prefill_bootstrap_address="127.0.0.1:1", sampling=fm.cpb.SamplingParams(temperature=float("nan"))
    ).SerializeToString(), C.INVALID_ARGUMENT, "INVALID_SAMPLING_PARAMS"),
    # a bootstrap address that is no host:port reached grpc's resolver
    ("decode", DECODE + "Decode", wpb.DecodeRequest, wpb.DecodeRequest(
        bootstrap_room=7, prompt=wpb.Prompt(text="x"), transfer_token=b"k" * 16, prefill_instance_id=PREFILL_ID,
        prefill_bootstrap_address="dns:///h:1").SerializeToString(), C.INVALID_ARGUMENT, "INVALID_ADDRESS"),
]


@pytest.mark.parametrize("service,method,request_type,data,code,reason", KNOWN,
                         ids=[f"{k[1].rsplit('/', 1)[1]}-{k[5]}" for k in KNOWN])
def test_known_bad_inputs(mesh, service, method, request_type, data, code, reason):
    mesh.fuzz(f"{service}.{method.rsplit('/', 1)[1]}", service, method, request_type,
              expect_all(Expect(frozenset({code}), reason=reason)), [data])


def test_a_malformed_message_while_the_stream_writes_ends_it_typed(mesh):
    """The session's late answers were being written when the bad message came: grpc refused the
    status (TOO_MANY_OPERATIONS) and the caller waited for its deadline (about 2 times in 3)."""
    busy = bpb.WatchRoomsRequest(bootstrap_rooms=[0] * 2000).SerializeToString()  # untagged: a flush
    streams = [[busy, b"\xff\xff"]] * 12
    mesh.fuzz("bootstrap.WatchRooms (write, then bad message)", "bootstrap", BOOTSTRAP + "WatchRooms",
              bpb.WatchRoomsRequest, None, streams, timeout_s=10.0,
              expect=Expect(frozenset({C.INVALID_ARGUMENT}), reason="MALFORMED_REQUEST"))


def test_a_decode_added_as_a_prefill_is_refused(mesh):
    """The router would have sent it Prefill calls (UNIMPLEMENTED) for every other request."""
    decode_alias = "localhost:" + mesh.address["decode"].rsplit(":", 1)[1]
    request = rpb.AddInstanceRequest(instance=rpb.Instance(role=cpb.INSTANCE_ROLE_PREFILL, address=decode_alias))
    mesh.fuzz("router.AddInstance", "router", ROUTER + "AddInstance", rpb.AddInstanceRequest,
              expect_all(Expect(frozenset({C.FAILED_PRECONDITION}), reason=Reason.INSTANCE_ROLE_MISMATCH)),
              [request.SerializeToString()])
    assert decode_alias not in [i.address for i in mesh.router_instances()]


# ---- afterwards ---------------------------------------------------------------------------------

def test_every_service_is_healthy_afterwards(mesh):
    if hasattr(mesh, "transport"):
        mesh.run(mesh.transport.close())
    assert mesh.alive(), mesh.up.tail()
    for service in ("bootstrap", "router", "prefill", "decode"):
        assert mesh.serving(service), f"{service} is not SERVING"
    assert mesh.registered_ids() == [PREFILL_ID]
    routed = mesh.router_instances()
    assert sorted(i.address for i in routed) == sorted([mesh.address["prefill"], mesh.address["decode"]])
    assert all(i.healthy for i in routed), routed
    deadline = time.monotonic() + 30
    for role in ("prefill", "decode"):
        while True:
            status = mesh.status(role)
            assert all(r.alive and r.restarts == 0 for r in status.ranks), status
            if all(r.free_pages == r.total_pages and r.active_requests == 0 for r in status.ranks):
                break
            assert time.monotonic() < deadline, f"{role} pools never came back: {status}"
            time.sleep(0.1)
    request = rpb.GenerateRequest(prompt=wpb.Prompt(text="after the fuzz"),
                                  sampling=cpb.SamplingParams(max_new_tokens=8, ignore_eos=True))
    out = mesh.run(mesh.callers["router"].server_stream(ROUTER + "Generate", request.SerializeToString(), 60))
    replies = [rpb.GenerateResponse.FromString(r) for r in out.responses]
    assert out.ok and sum(len(r.token_ids) for r in replies) == 8, out
    problems = mesh.log_problems()
    assert not problems, "\n".join(problems[:20])
    print("\n" + summary())
