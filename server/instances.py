"""Prefill instance records of the bootstrap registry: validation of `InstanceInfo` and the record kept.

An instance is valid when its id is non-empty (<= 128 characters), its epoch non-zero, its
dp/tp/pp sizes in 1..1024, its KV layout complete, its load-balance method set, and it lists
exactly one endpoint per DP rank with a `host:port` transfer address. Bad input is
INVALID_ARGUMENT (reason INVALID_INSTANCE_INFO, or INVALID_INSTANCE_ID / INVALID_DP_SIZE) and the
registry changes nothing.
"""

from __future__ import annotations

from pdmesh.bootstrap.v1 import bootstrap_pb2
from pdmesh.common.v1 import common_pb2
from pdmesh.errors import InvalidArgument
from pdmesh.reasons import Reason
from pdmesh.rules import MAX_DP_SIZE, validate_dp_size

MAX_ID_CHARS = 128
MAX_PARALLEL = 1024
MAX_LAYOUT_DIM = 1 << 20


class Instance:
    """One registered prefill instance (the registry's own copy of its info)."""

    __slots__ = ("info", "instance_id", "epoch", "dp_size", "method", "force_query", "last_seen")

    def __init__(self, info: bootstrap_pb2.InstanceInfo, now: float) -> None:
        self.info = info
        self.instance_id = info.instance_id
        self.epoch = info.epoch
        self.dp_size = info.dp_size
        self.method = info.load_balance_method
        self.force_query = info.force_query_prefill_dp_rank
        self.last_seen = now


def validate_instance_id(instance_id: str) -> str:
    if not instance_id or len(instance_id) > MAX_ID_CHARS:
        raise InvalidArgument(
            f"instance_id must be a non-empty string of at most {MAX_ID_CHARS} characters, "
            f"got {instance_id!r}", reason=Reason.INVALID_INSTANCE_ID, metadata={"instance_id": instance_id})
    return instance_id


def _bad(message: str, **metadata: object) -> InvalidArgument:
    return InvalidArgument(message, reason=Reason.INVALID_INSTANCE_INFO, metadata=metadata)


def _check_address(address: str, what: str, rank: int) -> None:
    host, sep, port = address.rpartition(":")
    # isascii: str.isdigit() is also true for "²" or "٣", which int() refuses or reads as 3
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise _bad(f"rank {rank} {what} must be host:port, got {address!r}", dp_rank=rank,
                   field=what, address=address)


def validate_instance(info: bootstrap_pb2.InstanceInfo) -> bootstrap_pb2.InstanceInfo:
    """Return `info` if it describes a usable prefill instance, else raise INVALID_ARGUMENT."""
    validate_instance_id(info.instance_id)
    if info.epoch == 0:
        raise _bad("epoch must be non-zero and change when the instance restarts "
                   "(its start time in ns, for example)", instance_id=info.instance_id)
    validate_dp_size(info.dp_size)
    for name in ("tp_size", "pp_size"):
        value = getattr(info, name)
        if not 1 <= value <= MAX_PARALLEL:
            raise _bad(f"{name} must be in 1..{MAX_PARALLEL}, got {value}", **{name: value})
    _validate_layout(info)
    if info.load_balance_method not in common_pb2.LoadBalanceMethod.values() or \
            info.load_balance_method == common_pb2.LOAD_BALANCE_METHOD_UNSPECIFIED:
        raise _bad("load_balance_method must be round_robin, shortest_queue or follow_bootstrap_room",
                   load_balance_method=info.load_balance_method)
    _validate_endpoints(info)
    return info


def _validate_layout(info: bootstrap_pb2.InstanceInfo) -> None:
    layout = info.kv_layout
    if not info.HasField("kv_layout"):
        raise _bad("kv_layout is required (num_layers, page_size, num_kv_heads, head_dim, dtype)")
    for name in ("num_layers", "page_size", "num_kv_heads", "head_dim"):
        value = getattr(layout, name)
        if not 1 <= value <= MAX_LAYOUT_DIM:
            raise _bad(f"kv_layout.{name} must be in 1..{MAX_LAYOUT_DIM}, got {value}", **{name: value})
    if layout.dtype == common_pb2.KV_DTYPE_UNSPECIFIED or layout.dtype not in common_pb2.KvDtype.values():
        raise _bad("kv_layout.dtype must be set (bf16, fp16, fp32 or fp64)", dtype=layout.dtype)


def _validate_endpoints(info: bootstrap_pb2.InstanceInfo) -> None:
    endpoints = info.rank_endpoints
    if len(endpoints) != info.dp_size:
        raise _bad(f"rank_endpoints must list each of the {info.dp_size} DP ranks once, "
                   f"got {len(endpoints)} entries", dp_size=info.dp_size, endpoints=len(endpoints))
    seen = set()
    for endpoint in endpoints:
        rank = endpoint.dp_rank
        if rank >= info.dp_size or rank in seen:
            raise _bad(f"rank_endpoints has rank {rank} twice or out of 0..{info.dp_size - 1}",
                       dp_rank=rank, dp_size=info.dp_size)
        seen.add(rank)
        _check_address(endpoint.transfer_address, "transfer_address", rank)
        if endpoint.control_address:
            _check_address(endpoint.control_address, "control_address", rank)


assert MAX_DP_SIZE == MAX_PARALLEL
