"""The DP-rank rules table of DESIGN.md, row by row (pdmesh.rules)."""

from __future__ import annotations

import grpc
import pytest

from pdmesh.common.v1 import common_pb2
from pdmesh.errors import FollowBootstrapRoomConflict, InvalidArgument, PdmeshError, \
    PrefillDpRankHintMismatch
from pdmesh.rules import MAX_ROOM, DecodeResolution, PrefillAction, decode_rule, prefill_rule, \
    validate_room

RR = common_pb2.LOAD_BALANCE_METHOD_ROUND_ROBIN
SQ = common_pb2.LOAD_BALANCE_METHOD_SHORTEST_QUEUE
FOLLOW = common_pb2.LOAD_BALANCE_METHOD_FOLLOW_BOOTSTRAP_ROOM


@pytest.mark.parametrize("room", [1, 2, 12345, MAX_ROOM])
def test_valid_rooms(room):
    assert validate_room(room) == room


@pytest.mark.parametrize("room", [0, -1, MAX_ROOM + 1, (1 << 64) - 1, True, 3.0, "7", None])
def test_invalid_rooms(room):
    with pytest.raises(InvalidArgument) as exc:
        validate_room(room)
    assert exc.value.reason == "INVALID_BOOTSTRAP_ROOM"
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT


# (dp_rank, dp_size, room, method, force_query, hint) -> expected action
PREFILL_TABLE = [
    ((1, 4, 101, RR, False, 1), PrefillAction.NONE_HINTED),  # hint == r
    ((0, 4, 100, FOLLOW, False, 0), PrefillAction.NONE_HINTED),  # the hint wins over the method
    ((2, 4, 101, FOLLOW, True, 2), PrefillAction.NONE_HINTED),
    ((2, 4, 101, RR, False, None), PrefillAction.REGISTER),  # not follow: register
    ((3, 4, 101, SQ, False, None), PrefillAction.REGISTER),
    ((1, 4, 101, FOLLOW, True, None), PrefillAction.REGISTER),  # force-query: register
    ((3, 4, 101, FOLLOW, True, None), PrefillAction.REGISTER),
    ((1, 4, 101, FOLLOW, False, None), PrefillAction.FAST_PATH),  # r == room % dp_size
    ((0, 1, 101, RR, False, None), PrefillAction.FAST_PATH),  # dp_size 1: decode infers 0
    ((0, 1, 101, FOLLOW, True, None), PrefillAction.FAST_PATH),
    ((0, 1, 101, RR, False, 0), PrefillAction.NONE_HINTED),
]


@pytest.mark.parametrize("args,expected", PREFILL_TABLE)
def test_prefill_rule_rows(args, expected):
    assert prefill_rule(*args) is expected


def test_hint_mismatch_fails_typed():
    with pytest.raises(PrefillDpRankHintMismatch) as exc:
        prefill_rule(2, 4, 101, RR, False, 1)
    err = exc.value
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "PREFILL_DP_RANK_HINT_MISMATCH"
    assert err.metadata == {"bootstrap_room": "101", "dispatched_dp_rank": "2", "implied_dp_rank": "1",
                            "dp_size": "4"}


def test_follow_conflict_fails_typed_and_names_the_escape_hatch():
    with pytest.raises(FollowBootstrapRoomConflict) as exc:
        prefill_rule(2, 4, 101, FOLLOW, False, None)
    err = exc.value
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "FOLLOW_BOOTSTRAP_ROOM_CONFLICT"
    assert err.metadata["bootstrap_room"] == "101"
    assert err.metadata["dispatched_dp_rank"] == "2"
    assert err.metadata["implied_dp_rank"] == "1"
    assert "PDMESH_FORCE_QUERY_PREFILL_DP_RANK=1" in err.message
    # The typed error survives the trip through a gRPC status.
    info = err.to_status()
    assert info.code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("args,reason", [
    ((0, 4, 0, RR, False, None), "INVALID_BOOTSTRAP_ROOM"),
    ((0, 4, MAX_ROOM + 1, RR, False, None), "INVALID_BOOTSTRAP_ROOM"),
    ((4, 4, 101, RR, False, None), "DP_RANK_OUT_OF_RANGE"),  # rank >= dp_size
    ((0, 4, 101, RR, False, 4), "DP_RANK_OUT_OF_RANGE"),  # hint >= dp_size
    ((0, 4, 101, RR, False, -1), "DP_RANK_OUT_OF_RANGE"),
    ((0, 0, 101, RR, False, None), "INVALID_DP_SIZE"),
    ((0, 5000, 101, RR, False, None), "INVALID_DP_SIZE"),
])
def test_prefill_rule_rejects_bad_input(args, reason):
    with pytest.raises(InvalidArgument) as exc:
        prefill_rule(*args)
    assert exc.value.reason == reason


# (room, hint, prefill_dp_size, prefill_method, prefill_force_query) -> resolution
DECODE_TABLE = [
    ((101, 3, 4, RR, False), DecodeResolution(3, "hint")),
    ((101, 0, 4, FOLLOW, False), DecodeResolution(0, "hint")),  # the hint wins over room % dp_size
    ((101, None, 1, RR, True), DecodeResolution(0, "dp1")),
    ((101, None, 4, FOLLOW, False), DecodeResolution(1, "fast_path")),
    ((MAX_ROOM, None, 64, FOLLOW, False), DecodeResolution(MAX_ROOM % 64, "fast_path")),
    ((101, None, 4, FOLLOW, True), DecodeResolution(None, "lookup")),  # force-query: look up
    ((101, None, 4, RR, False), DecodeResolution(None, "lookup")),
    ((101, None, 4, SQ, False), DecodeResolution(None, "lookup")),
]


@pytest.mark.parametrize("args,expected", DECODE_TABLE)
def test_decode_rule_rows(args, expected):
    resolution = decode_rule(*args)
    assert resolution == expected
    assert resolution.needs_lookup == (expected.path == "lookup")


@pytest.mark.parametrize("args,reason", [
    ((101, 4, 4, RR, False), "DP_RANK_OUT_OF_RANGE"),
    ((0, None, 4, RR, False), "INVALID_BOOTSTRAP_ROOM"),
    ((1 << 63, None, 4, FOLLOW, False), "INVALID_BOOTSTRAP_ROOM"),
    ((101, None, 0, RR, False), "INVALID_DP_SIZE"),
])
def test_decode_rule_rejects_bad_input(args, reason):
    with pytest.raises(PdmeshError) as exc:
        decode_rule(*args)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.reason == reason
