"""Hypothesis strategies for every pdmesh request, and the model of which inputs are bad.

Each strategy draws the serialized bytes of one request: a message built from fields that range
from sane to absurd (rooms 0 and >= 2^63, ranks up to 2^32-1, empty and 200 000-character
strings, prompts of 300 000 tokens, NaN and infinite sampling parameters, malformed addresses),
the same message with a byte changed or cut short, or random bytes. The `*_model` functions say
what the mesh must answer for a parsed message (fuzz_oracle.Expect): INVALID_ARGUMENT where a
field is certainly out of range, otherwise any typed outcome. They are written from DESIGN.md
and the proto comments, not from the servicers, and only mark what is certain.
"""

from __future__ import annotations

import math
import re

from hypothesis import strategies as st

from pdmesh.bootstrap.v1 import bootstrap_pb2 as bpb
from pdmesh.common.v1 import common_pb2 as cpb
from pdmesh.router.v1 import router_pb2 as rpb
from pdmesh.worker.engine.config import PRESETS
from pdmesh.worker.v1 import worker_pb2 as wpb
from fuzz_oracle import ANY, C, INVALID, WAITS, Expect

U32, U64, MAX_ROOM = (1 << 32) - 1, (1 << 64) - 1, (1 << 63) - 1
DP = 2  # the mesh's prefill and decode dp_size
VOCAB, MAX_SEQ = PRESETS["tiny"].vocab_size, PRESETS["tiny"].max_seq_len
OK_ONLY = Expect(frozenset({C.OK}))

ROOMS = st.one_of(st.sampled_from([0, 1, 2, 3, MAX_ROOM, MAX_ROOM + 1, (1 << 63) | 5, U64]),
                  st.integers(1, MAX_ROOM), st.integers(MAX_ROOM + 1, U64))
RANKS = st.one_of(st.integers(0, DP), st.sampled_from([1023, 1024, 1 << 31, U32]), st.integers(0, U32))
HUGE = ["x" * 129, "x" * 4096, "z" * 200_000]
TEXT = st.one_of(st.just(""), st.text(max_size=24), st.sampled_from(["\x00", "é" * 64, "\U0001f600", *HUGE]))
IDS = st.one_of(TEXT, st.text("abc-", min_size=1, max_size=6).map(lambda s: "fuzz-" + s))
FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, -1.0, math.nan, math.inf, -math.inf,
                                    3.4e38, 1e-45]), st.floats(width=32))
BUDGETS = st.one_of(st.integers(0, 6), st.sampled_from([1 << 20, (1 << 20) + 1, U32]))
TOKENS = st.one_of(st.binary(min_size=16, max_size=64), st.binary(max_size=15),
                   st.binary(min_size=65, max_size=300))
BAD_ADDRESSES = ["", "nocolon", "h:", ":5", "h:0", "h:65536", "h:-1", "h:²", "h:٣", "h:8 ", "h:+8",
                 "h:99999999999999999999", "[::1]:7", "127.0.0.1:1", "localhost:1", "a b:5", "h/x:5",
                 "dns:///h:5", "ucx://127.0.0.1:1", "ucx://:9", "\x00:1", "h" * 300 + ":5"]
ADDRESSES = st.one_of(st.sampled_from(BAD_ADDRESSES), TEXT, TEXT.map(lambda t: t + ":1"))
_PORT = re.compile(r"[0-9]+")


# ---- wire: a message, the message damaged, or noise --------------------------------------------

def times(strategy, n: int) -> list:
    """`strategy` n times as distinct branches of a one_of (it merges equal branches into one)."""
    return [strategy.map(lambda x: x) for _ in range(n)]


def _damage(args) -> bytes:
    data, where, value, cut = args
    data = bytearray(data)
    if data:
        data[where % len(data)] = value
    return bytes(data[:cut % (len(data) + 1)] if cut % 3 == 0 else data)


def wire(messages) -> st.SearchStrategy[bytes]:
    encoded = messages.map(lambda m: m.SerializeToString())
    damaged = st.tuples(encoded, st.integers(0, 1 << 16), st.integers(0, 255), st.integers(0, 1 << 16))
    return st.one_of(*times(encoded, 3), damaged.map(_damage), st.binary(max_size=48))


# ---- field models ----------------------------------------------------------------------------

def room_bad(room: int) -> bool:
    return not 0 < room <= MAX_ROOM


def id_bad(instance_id: str) -> bool:
    return not instance_id or len(instance_id) > 128


def address_bad(address: str) -> bool:
    """Certainly not host:port (the services may refuse more, e.g. spaces in the host)."""
    host, sep, port = address.rpartition(":")
    return not sep or not host or not _PORT.fullmatch(port) or not 0 < int(port) < 65536


def prompt_bad(prompt: wpb.Prompt) -> bool:
    kind = prompt.WhichOneof("kind")
    if kind == "text" and prompt.text:
        return len(prompt.text.encode()) + 1 >= MAX_SEQ  # the byte tokenizer adds BOS
    if kind == "token_ids" and prompt.token_ids.ids:
        ids = prompt.token_ids.ids
        return len(ids) >= MAX_SEQ or max(ids) >= VOCAB
    return True


def sampling_bad(s: cpb.SamplingParams) -> bool:
    top_p = s.top_p or 1.0
    return not (math.isfinite(s.temperature) and s.temperature >= 0) or not 0 < top_p <= 1


# ---- worker requests ---------------------------------------------------------------------------

def mostly(sane, wild):
    """Three draws in four from `sane`, so that deep paths see inputs that pass the first checks."""
    return st.one_of(*times(sane, 3), wild)


def _prompt(kind: int, text: str, ids: list[int]) -> wpb.Prompt | None:
    return [None, wpb.Prompt(text=text), wpb.Prompt(token_ids=wpb.TokenIds(ids=ids))][kind]


PROMPTS = mostly(
    st.builds(_prompt, st.integers(1, 2), st.text(min_size=1, max_size=16),
              st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24)),
    st.builds(_prompt, st.integers(0, 2), TEXT, st.one_of(
        st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24), st.lists(st.integers(0, U32), max_size=24),
        st.sampled_from([MAX_SEQ, 5000, 300_000]).map(lambda n: [65] * n))))
GOOD_ROOMS = mostly(st.integers(1, MAX_ROOM), ROOMS)
GOOD_TOKENS = mostly(st.binary(min_size=16, max_size=64), TOKENS)
GOOD_RANKS = st.one_of(*times(st.none(), 3), st.integers(0, DP - 1), RANKS)
SAMPLING = st.builds(cpb.SamplingParams, max_new_tokens=BUDGETS, temperature=FLOATS, top_p=FLOATS,
                     seed=st.integers(0, U64), ignore_eos=st.booleans())
SANE_SAMPLING = st.builds(cpb.SamplingParams, max_new_tokens=st.integers(0, 6),
                          temperature=st.sampled_from([0.0, 0.7]), top_p=st.sampled_from([0.0, 0.9]))


def _optional(message, **fields):
    for name, value in fields.items():
        if value is not None:
            setattr(message, name, value)
    return message


def prefill_requests() -> st.SearchStrategy[bytes]:
    def build(room, prompt, sampling, routed, hint, token, request_id):
        m = wpb.PrefillRequest(bootstrap_room=room, prompt=prompt, sampling=sampling,
                               transfer_token=token, request_id=request_id)
        return _optional(m, routed_dp_rank=routed, disagg_prefill_dp_rank=hint)
    return wire(st.builds(build, GOOD_ROOMS, PROMPTS, mostly(SANE_SAMPLING, SAMPLING), GOOD_RANKS,
                          GOOD_RANKS, GOOD_TOKENS, TEXT))


def prefill_model(m: wpb.PrefillRequest) -> Expect:
    bad = (room_bad(m.bootstrap_room) or not 16 <= len(m.transfer_token) <= 64
           or (m.HasField("routed_dp_rank") and m.routed_dp_rank >= DP)
           or (m.HasField("disagg_prefill_dp_rank") and m.disagg_prefill_dp_rank >= DP)
           or prompt_bad(m.prompt) or sampling_bad(m.sampling))
    return INVALID if bad else WAITS  # a good one computes, then waits for a decode that never comes


def decode_requests(prefill_ids, bootstrap_addresses) -> st.SearchStrategy[bytes]:
    def build(room, prompt, sampling, prefill_id, bootstrap, hint, token):
        m = wpb.DecodeRequest(bootstrap_room=room, prompt=prompt, sampling=sampling, transfer_token=token,
                              prefill_instance_id=prefill_id, prefill_bootstrap_address=bootstrap)
        return _optional(m, disagg_prefill_dp_rank=hint)
    return wire(st.builds(build, GOOD_ROOMS, PROMPTS, mostly(SANE_SAMPLING, SAMPLING),
                          st.one_of(st.sampled_from(prefill_ids), IDS),
                          st.one_of(st.sampled_from(bootstrap_addresses), ADDRESSES),
                          GOOD_RANKS, GOOD_TOKENS))


def decode_model(m: wpb.DecodeRequest) -> Expect:
    bad = (room_bad(m.bootstrap_room) or not 16 <= len(m.transfer_token) <= 64 or prompt_bad(m.prompt)
           or m.sampling.max_new_tokens > 1 << 20 or sampling_bad(m.sampling)
           or not m.prefill_instance_id or address_bad(m.prefill_bootstrap_address))
    return INVALID if bad else WAITS  # a good one waits for KV that no prefill offers


def abort_requests() -> st.SearchStrategy[bytes]:
    return wire(st.builds(wpb.AbortRoomRequest, bootstrap_room=ROOMS, reason=TEXT))


def abort_model(m: wpb.AbortRoomRequest) -> Expect:
    return INVALID if room_bad(m.bootstrap_room) else OK_ONLY


# ---- router ------------------------------------------------------------------------------------

def generate_requests() -> st.SearchStrategy[bytes]:
    def build(prompt, sampling, n, routed):
        return _optional(rpb.GenerateRequest(prompt=prompt, sampling=sampling, n=n), routed_dp_rank=routed)
    return wire(st.builds(build, PROMPTS, mostly(SANE_SAMPLING, SAMPLING),
                          st.one_of(st.integers(0, 3), st.sampled_from([16, 17, U32])), GOOD_RANKS))


def generate_model(m: rpb.GenerateRequest) -> Expect:
    s = m.sampling
    if ((m.n or 1) > 16 or (m.HasField("routed_dp_rank") and m.routed_dp_rank >= DP) or prompt_bad(m.prompt)
            or sampling_bad(s) or s.max_new_tokens > 1 << 20):
        return INVALID
    if s.max_new_tokens <= 64 and len(m.prompt.text) + len(m.prompt.token_ids.ids) <= 64:
        return OK_ONLY  # a small, good request through a healthy mesh must succeed
    return WAITS  # a good one with a budget of 2^20 runs until the client's deadline


def add_instance_requests(addresses) -> st.SearchStrategy[bytes]:
    instance = st.builds(rpb.Instance, role=mostly(st.integers(1, 2), st.integers(0, U32)),
                         address=mostly(st.sampled_from(addresses), ADDRESSES),
                         bootstrap_address=mostly(st.just(""), ADDRESSES))
    return wire(st.builds(rpb.AddInstanceRequest, instance=instance))


def add_instance_model(m: rpb.AddInstanceRequest) -> Expect:
    i = m.instance
    bad = (i.role not in (cpb.INSTANCE_ROLE_PREFILL, cpb.INSTANCE_ROLE_DECODE) or address_bad(i.address)
           or (i.bootstrap_address and address_bad(i.bootstrap_address)))
    return INVALID if bad else ANY


# ---- bootstrap ---------------------------------------------------------------------------------

DIMS = st.one_of(st.integers(1, 64), st.sampled_from([0, 1 << 20, (1 << 20) + 1, U32]))
LAYOUTS = st.builds(cpb.KvLayout, num_layers=DIMS, page_size=DIMS, num_kv_heads=DIMS, head_dim=DIMS,
                    dtype=st.integers(0, 6))
SIZES = st.one_of(st.integers(1, 3), st.sampled_from([0, 1024, 1025, U32]))
ENDPOINTS = st.builds(bpb.RankEndpoint, dp_rank=RANKS, transfer_address=ADDRESSES,
                      control_address=st.one_of(st.just(""), ADDRESSES))


def _good_info(instance_id, epoch, dp_size, method, layout, addresses):
    endpoints = [bpb.RankEndpoint(dp_rank=r, transfer_address=addresses[r % len(addresses)])
                 for r in range(dp_size)]
    return bpb.InstanceInfo(instance_id=instance_id, epoch=epoch, dp_size=dp_size, tp_size=1, pp_size=1,
                            kv_layout=layout, load_balance_method=method, rank_endpoints=endpoints)


GOOD_ADDRESSES = st.lists(st.sampled_from(["127.0.0.1:1", "ucx://127.0.0.1:1", "ucx://h:9", "u:65535"]),
                          min_size=1, max_size=3)
INFOS = st.one_of(
    st.builds(bpb.InstanceInfo, instance_id=IDS, epoch=st.one_of(st.just(0), st.integers(1, U64)),
              dp_size=SIZES, tp_size=SIZES, pp_size=SIZES, kv_layout=st.none() | LAYOUTS,
              load_balance_method=st.integers(0, 5), force_query_prefill_dp_rank=st.booleans(),
              rank_endpoints=st.lists(ENDPOINTS, max_size=3), control_address=ADDRESSES),
    st.builds(_good_info, IDS, st.integers(1, U64), st.integers(1, 3), st.integers(1, 3), LAYOUTS,
              GOOD_ADDRESSES))


def register_instance_requests() -> st.SearchStrategy[bytes]:
    return wire(st.builds(bpb.RegisterInstanceRequest, info=INFOS))


def instance_info_bad(i: bpb.InstanceInfo) -> bool:
    layout, ranks = i.kv_layout, sorted(e.dp_rank for e in i.rank_endpoints)
    return (id_bad(i.instance_id) or i.epoch == 0
            or not all(1 <= v <= 1024 for v in (i.dp_size, i.tp_size, i.pp_size))
            or not i.HasField("kv_layout")
            or not all(1 <= v <= 1 << 20 for v in (layout.num_layers, layout.page_size,
                                                   layout.num_kv_heads, layout.head_dim))
            or layout.dtype not in (1, 2, 3, 4) or i.load_balance_method not in (1, 2, 3)
            or ranks != list(range(i.dp_size))
            or any(address_bad(e.transfer_address) or (e.control_address and address_bad(e.control_address))
                   for e in i.rank_endpoints))


def register_instance_model(m: bpb.RegisterInstanceRequest) -> Expect:
    return INVALID if instance_info_bad(m.info) else ANY


def by_id_requests(request_type) -> st.SearchStrategy[bytes]:
    """Deregister, Heartbeat and GetInstance: an instance id (and an epoch)."""
    fields = {"instance_id": IDS}
    if "epoch" in request_type.DESCRIPTOR.fields_by_name:
        fields["epoch"] = st.one_of(st.just(0), st.integers(0, U64))
    return wire(st.builds(request_type, **fields))


def by_id_model(m) -> Expect:
    return INVALID if id_bad(m.instance_id) else ANY


def register_room_requests(instance_ids) -> st.SearchStrategy[bytes]:
    def build(instance_id, room, rank, request_id, epoch):
        return _optional(bpb.RegisterRoomRequest(instance_id=instance_id, bootstrap_room=room,
                                                 request_id=request_id, epoch=epoch), dp_rank=rank)
    return wire(st.builds(build, st.one_of(st.sampled_from(instance_ids), IDS), ROOMS, st.none() | RANKS,
                          TEXT, st.one_of(st.just(0), st.integers(0, U64))))


def _registrations(instance_ids) -> st.SearchStrategy[bpb.RoomRegistration]:
    def build(instance_id, room, rank, request_id, epoch):
        return _optional(bpb.RoomRegistration(instance_id=instance_id, bootstrap_room=room,
                                              request_id=request_id, epoch=epoch), dp_rank=rank)
    return st.builds(build, st.one_of(st.sampled_from(instance_ids), IDS), ROOMS, st.none() | RANKS,
                     TEXT, st.one_of(st.just(0), st.integers(0, U64)))


def register_stream_streams(instance_ids) -> st.SearchStrategy[list[bytes]]:
    """Streams of RegisterRoomsStream messages: tagged batches of registrations and removals, some
    damaged."""
    request = st.builds(bpb.RegisterRoomsStreamRequest, tag=st.one_of(st.integers(0, 3), st.integers(0, U64)),
                        registrations=st.lists(_registrations(instance_ids), max_size=6),
                        remove_bootstrap_rooms=st.lists(ROOMS, max_size=3))
    return st.lists(wire(request), min_size=0, max_size=4)


def register_room_model(m: bpb.RegisterRoomRequest | bpb.RoomRegistration) -> Expect:
    bad = (not m.HasField("dp_rank") or room_bad(m.bootstrap_room) or len(m.request_id) > 128
           or id_bad(m.instance_id))
    return INVALID if bad else ANY


def lookup_room_requests() -> st.SearchStrategy[bytes]:
    return wire(st.builds(bpb.LookupRoomRequest, bootstrap_room=ROOMS, wait=st.booleans(),
                          wait_timeout_ms=st.one_of(st.integers(0, 200), st.sampled_from([U32]))))


def lookup_room_model(m: bpb.LookupRoomRequest) -> Expect:
    if room_bad(m.bootstrap_room):
        return INVALID
    if m.wait:
        return Expect(frozenset({C.OK, C.DEADLINE_EXCEEDED}), may_wait=True)
    return Expect(frozenset({C.OK, C.NOT_FOUND}))


def remove_room_requests() -> st.SearchStrategy[bytes]:
    return wire(st.builds(bpb.RemoveRoomRequest, bootstrap_room=ROOMS))


def remove_room_model(m: bpb.RemoveRoomRequest) -> Expect:
    return INVALID if room_bad(m.bootstrap_room) else Expect(frozenset({C.OK, C.NOT_FOUND}))


SMALL_ROOM_LISTS = st.lists(ROOMS, max_size=8)
# now and then more waits than the service's max_waiters (65536): those rooms fail, the stream goes on
WAIT_LISTS = st.one_of(*times(SMALL_ROOM_LISTS, 7), st.just(list(range(1 << 40, (1 << 40) + 70_000))))
WATCH = st.builds(bpb.WatchRoomsRequest, tag=st.one_of(st.integers(0, 3), st.integers(0, U64)),
                  bootstrap_rooms=SMALL_ROOM_LISTS, wait_bootstrap_rooms=WAIT_LISTS,
                  wait_timeout_ms=st.one_of(*times(st.integers(1, 150), 3), st.sampled_from([0, U32])),
                  cancel_bootstrap_rooms=st.lists(ROOMS, max_size=4))


def watch_streams() -> st.SearchStrategy[list[bytes]]:
    return st.lists(wire(WATCH), min_size=0, max_size=5)
