"""The DP-rank rules of DESIGN.md as pure functions: which prefill rank holds a room's KV.

A prefill instance runs `dp_size` DP ranks. The router draws a `bootstrap_room` per request and
may pin a prefill rank (`routed_dp_rank` to the prefill; the same value as the hint
`disagg_prefill_dp_rank` to both sides). Two rules keep both sides in agreement:

- `prefill_rule`, run by prefill rank r when it takes room R, says whether r must register
  (R -> r) at the bootstrap service before offering the KV, may skip it, or must fail.
- `decode_rule`, run by a decode rank, says which prefill rank holds R, or that it must ask the
  bootstrap service (`DecodeResolution.path == "lookup"`, a wait bounded by the request deadline).

Both read the prefill's load-balance method and force-query flag from the prefill's instance info,
so they cannot disagree. Invariant (tested over all inputs in tests/test_rules_property.py): the
decode takes its KV from the rank that holds it, or the request fails with a typed status.

Room validation lives here once (`validate_room`); the bootstrap service and the workers use it.
Methods are `pdmesh.common.v1.LoadBalanceMethod` values (plain ints).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pdmesh.common.v1 import common_pb2
from pdmesh.errors import FollowBootstrapRoomConflict, InvalidArgument, PrefillDpRankHintMismatch
from pdmesh.reasons import Reason

MAX_ROOM = (1 << 63) - 1  # valid rooms are 1 .. 2^63-1; 0 means unset
MAX_DP_SIZE = 1024
FOLLOW = common_pb2.LOAD_BALANCE_METHOD_FOLLOW_BOOTSTRAP_ROOM
FORCE_QUERY_ENV = "PDMESH_FORCE_QUERY_PREFILL_DP_RANK"


class PrefillAction(enum.Enum):
    """What a prefill rank does about the bootstrap service for one room."""

    NONE_HINTED = "none_hinted"  # the request carries the hint == this rank: decode was told
    REGISTER = "register"  # register (room -> rank) before the KV is offered
    FAST_PATH = "fast_path"  # decode infers the rank (room % dp_size, or dp_size 1): register nothing


@dataclass(frozen=True)
class DecodeResolution:
    """How a decode rank finds the prefill rank of a room.

    `path` is "hint" (the request's disagg_prefill_dp_rank), "dp1" (the prefill has one rank),
    "fast_path" (follow_bootstrap_room: room % dp_size) with `dp_rank` set, or "lookup" with
    `dp_rank` None: ask the prefill's bootstrap service and wait until the room registers or the
    request's deadline passes.
    """

    dp_rank: int | None
    path: str

    @property
    def needs_lookup(self) -> bool:
        return self.path == "lookup"


def validate_room(room: object) -> int:
    """Return `room` if it is a valid bootstrap room (an int in 1 .. 2^63-1), else INVALID_ARGUMENT."""
    if type(room) is not int or not 0 < room <= MAX_ROOM:  # bool is not a room
        raise InvalidArgument(
            f"bootstrap_room must be an integer in 1..2^63-1 (0 means unset), got {room!r}",
            reason=Reason.INVALID_BOOTSTRAP_ROOM, metadata={"bootstrap_room": room})
    return room


def validate_dp_size(dp_size: object) -> int:
    """Return `dp_size` if it is an int in 1 .. MAX_DP_SIZE, else INVALID_ARGUMENT."""
    if type(dp_size) is not int or not 1 <= dp_size <= MAX_DP_SIZE:
        raise InvalidArgument(f"dp_size must be an integer in 1..{MAX_DP_SIZE}, got {dp_size!r}",
                              reason=Reason.INVALID_DP_SIZE, metadata={"dp_size": dp_size})
    return dp_size


def validate_dp_rank(dp_rank: object, dp_size: int, *, field: str = "dp_rank") -> int:
    """Return `dp_rank` if it is an int in 0 .. dp_size-1, else INVALID_ARGUMENT DP_RANK_OUT_OF_RANGE."""
    if type(dp_rank) is not int or not 0 <= dp_rank < dp_size:
        raise InvalidArgument(
            f"{field} must be an integer in 0..{dp_size - 1} (dp_size {dp_size}), got {dp_rank!r}",
            reason=Reason.DP_RANK_OUT_OF_RANGE, metadata={field: dp_rank, "dp_size": dp_size})
    return dp_rank


def optional_dp_rank(message, field: str) -> int | None:
    """The value of the `optional uint32` DP-rank `field` of a proto message, None when unset
    (rank 0 is a valid rank, so unset and 0 differ)."""
    return getattr(message, field) if message.HasField(field) else None


def required_dp_rank(message, field: str = "dp_rank") -> int:
    """The DP-rank `field` of a proto message, INVALID_ARGUMENT DP_RANK_MISSING when unset."""
    rank = optional_dp_rank(message, field)
    if rank is None:
        raise InvalidArgument(f"{field} is required (rank 0 is valid and must be set explicitly)",
                              reason=Reason.DP_RANK_MISSING,
                              metadata={"bootstrap_room": getattr(message, "bootstrap_room", 0)})
    return rank


def prefill_rule(dp_rank: int, dp_size: int, room: int, method: int, force_query: bool,
                 hint: int | None) -> PrefillAction:
    """The prefill side: what rank `dp_rank` does for `room` (DESIGN.md, first matching row wins).

    `method` is the instance's LoadBalanceMethod, `force_query` its force-query flag, `hint` the
    request's `disagg_prefill_dp_rank` (None when absent). Raises InvalidArgument for a bad room,
    size, rank or hint (>= dp_size); PrefillDpRankHintMismatch when the hint names another rank;
    FollowBootstrapRoomConflict when follow_bootstrap_room dispatched to a rank other than
    room % dp_size (the message names the escape hatch PDMESH_FORCE_QUERY_PREFILL_DP_RANK=1).
    """
    validate_room(room)
    validate_dp_size(dp_size)
    validate_dp_rank(dp_rank, dp_size)
    if hint is not None:
        validate_dp_rank(hint, dp_size, field="disagg_prefill_dp_rank")
        if hint == dp_rank:
            return PrefillAction.NONE_HINTED
        raise PrefillDpRankHintMismatch(
            f"room {room} carries disagg_prefill_dp_rank {hint} but was dispatched to prefill DP "
            f"rank {dp_rank}; the decode would look for the KV on rank {hint}. Route the request to "
            f"rank {hint} (routed_dp_rank) or drop the hint.",
            metadata={"bootstrap_room": room, "dispatched_dp_rank": dp_rank, "implied_dp_rank": hint,
                      "dp_size": dp_size})
    if dp_size == 1:
        return PrefillAction.FAST_PATH
    if method != FOLLOW or force_query:
        return PrefillAction.REGISTER
    implied = room % dp_size
    if dp_rank == implied:
        return PrefillAction.FAST_PATH
    raise FollowBootstrapRoomConflict(
        f"room {room} was dispatched to prefill DP rank {dp_rank}, but follow_bootstrap_room implies "
        f"rank {implied} (room % dp_size {dp_size}) and the decode will fetch from there without a "
        f"lookup. Do not pin routed_dp_rank under follow_bootstrap_room, or start the prefill with "
        f"{FORCE_QUERY_ENV}=1 so ranks register and decodes look rooms up.",
        metadata={"bootstrap_room": room, "dispatched_dp_rank": dp_rank, "implied_dp_rank": implied,
                  "dp_size": dp_size})


def decode_rule(room: int, hint: int | None, prefill_dp_size: int, prefill_method: int,
                prefill_force_query: bool) -> DecodeResolution:
    """The decode side: where the KV of `room` lives on the prefill (first match wins).

    The hint (INVALID_ARGUMENT if not < prefill_dp_size); 0 when the prefill has one rank;
    room % dp_size under follow_bootstrap_room with force-query off; otherwise "lookup".
    """
    validate_room(room)
    validate_dp_size(prefill_dp_size)
    if hint is not None:
        return DecodeResolution(validate_dp_rank(hint, prefill_dp_size, field="disagg_prefill_dp_rank"),
                                "hint")
    if prefill_dp_size == 1:
        return DecodeResolution(0, "dp1")
    if prefill_method == FOLLOW and not prefill_force_query:
        return DecodeResolution(room % prefill_dp_size, "fast_path")
    return DecodeResolution(None, "lookup")
