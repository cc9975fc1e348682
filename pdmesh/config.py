"""Helpers that turn flags and `PDMESH_*` environment variables into typed config values.

Each service owns one frozen config dataclass, built only in its entry point (flags first, then
the environment as the flag's default) and passed down; nothing else reads the environment.
"""

from __future__ import annotations

import os

from pdmesh.common.v1 import common_pb2

#: Load-balance methods as flags spell them, and their `pdmesh.common.v1.LoadBalanceMethod` values.
LOAD_BALANCE_METHODS = {
    "round_robin": common_pb2.LOAD_BALANCE_METHOD_ROUND_ROBIN,
    "shortest_queue": common_pb2.LOAD_BALANCE_METHOD_SHORTEST_QUEUE,
    "follow_bootstrap_room": common_pb2.LOAD_BALANCE_METHOD_FOLLOW_BOOTSTRAP_ROOM,
}
#: Instance roles as flags and logs spell them, and their `pdmesh.common.v1.InstanceRole` values.
INSTANCE_ROLES = {
    "prefill": common_pb2.INSTANCE_ROLE_PREFILL,
    "decode": common_pb2.INSTANCE_ROLE_DECODE,
}


def env(name: str, default: str | None = None) -> str | None:
    """The value of `PDMESH_<name>`, or `default`."""
    return os.environ.get(f"PDMESH_{name}", default)


def env_bool(name: str) -> bool | None:
    """A boolean `PDMESH_<name>`: 1/true/yes/on are true, anything else false; None when unset."""
    value = (env(name) or "").strip().lower()
    return None if not value else value in {"1", "true", "yes", "on"}


def env_flag(name: str) -> bool:
    """A boolean `PDMESH_<name>`, false when unset (see `env_bool`)."""
    return bool(env_bool(name))


#: The deadline of a call whose caller set none (grpcurl, say): every call has one.
DEFAULT_DEADLINE_S = 300.0
