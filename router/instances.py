"""The router's table of prefill and decode instances: channels, health, load and choice.

Each instance gets one reused channel, an admission gate, and a status poller that learns its id,
dp_size, load-balance method and bootstrap address and marks it healthy or not. `choose` picks a
healthy instance of a role by round robin (one turn per role) or by least outstanding requests.

Liveness: an instance that cannot be reached (the connection is refused or lost: UNAVAILABLE) is
unhealthy at the next poll; one that answers its status too slowly (a busy 2-core box under load)
stays as it was until `MAX_SLOW_POLLS` polls in a row were slow. Channels reconnect within a
second (`RECONNECT_OPTIONS`), so an instance replaced on the same address is healthy again at the
first poll after it serves. A draining instance is skipped (`mark_draining` does it at once when a
worker refuses a request with INSTANCE_DRAINING, before the next poll would).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field

import grpc

from pdmesh import grpcutil
from pdmesh.addresses import validate_address
from pdmesh.common.v1 import common_pb2
from pdmesh.config import INSTANCE_ROLES
from pdmesh.errors import FailedPrecondition, InvalidArgument, NotFound, PdmeshError, Unavailable
from pdmesh.reasons import Reason
from pdmesh.router.admission import Admission
from pdmesh.router.v1 import router_pb2
from pdmesh.tls import TlsConfig
from pdmesh.worker.client import WorkerClient

log = logging.getLogger(__name__)

PREFILL, DECODE = INSTANCE_ROLES["prefill"], INSTANCE_ROLES["decode"]
#: Slow status answers in a row (DEADLINE_EXCEEDED) before an instance counts as unhealthy.
MAX_SLOW_POLLS = 3
#: Reconnect quickly after an instance restarts (grpc's default backoff grows to 120 s).
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000))
ROLE_NAMES = {role: name for name, role in INSTANCE_ROLES.items()}


@dataclass
class InstanceEntry:
    """One instance as the router knows it."""

    role: int
    address: str
    channel: grpc.aio.Channel
    client: WorkerClient
    admission: Admission
    bootstrap_address: str = ""
    instance_id: str = ""
    dp_size: int = 1
    #: A `pdmesh.common.v1.LoadBalanceMethod` (UNSPECIFIED until the instance answered).
    load_balance_method: int = common_pb2.LOAD_BALANCE_METHOD_UNSPECIFIED
    healthy: bool = False
    #: The role the instance itself reports (INSTANCE_ROLE_UNSPECIFIED until it answered).
    reported_role: int = common_pb2.INSTANCE_ROLE_UNSPECIFIED
    draining: bool = False
    outstanding: int = 0
    rank_loads: list[int] = field(default_factory=list)
    poller: asyncio.Task | None = None
    slow_polls: int = 0

    def to_proto(self) -> router_pb2.Instance:
        return router_pb2.Instance(role=self.role, address=self.address,
                                   bootstrap_address=self.bootstrap_address,
                                   instance_id=self.instance_id, dp_size=self.dp_size,
                                   healthy=self.healthy, outstanding_requests=self.outstanding)

    def least_loaded_rank(self) -> int:
        loads = self.rank_loads or [0] * self.dp_size
        return min(range(len(loads)), key=lambda r: loads[r])


class InstanceTable:
    """Every instance by address; the only place that adds, removes or picks instances."""

    def __init__(self, *, policy: str = "round_robin", max_in_flight: int = 256, max_queued: int = 1024,
                 queue_timeout_s: float = 5.0, poll_interval_s: float = 1.0,
                 credentials: grpc.ChannelCredentials | None = None, tls: TlsConfig | None = None) -> None:
        if policy not in ("round_robin", "least_outstanding"):
            raise InvalidArgument(f"unknown router policy {policy!r}; choose round_robin or least_outstanding")
        self.policy = policy
        self._limits = (max_in_flight, max_queued, queue_timeout_s)
        self._poll_interval_s = poll_interval_s
        self._credentials = credentials
        self._tls = tls
        self._entries: dict[str, InstanceEntry] = {}
        self._counters = {PREFILL: itertools.count(), DECODE: itertools.count()}

    async def add(self, role: int, address: str, bootstrap_address: str = "") -> InstanceEntry:
        if role not in ROLE_NAMES:
            raise InvalidArgument("instance role must be INSTANCE_ROLE_PREFILL or INSTANCE_ROLE_DECODE")
        validate_address(address, "instance address")
        if bootstrap_address:
            validate_address(bootstrap_address, "bootstrap_address")
        if address in self._entries:
            entry = self._entries[address]
            if entry.role != role:
                raise InvalidArgument(f"{address} is already a {ROLE_NAMES[entry.role]} instance")
            return entry
        channel = grpcutil.open_channel(address, credentials=self._credentials, tls=self._tls,
                                        options=RECONNECT_OPTIONS)
        entry = InstanceEntry(role, address, channel, WorkerClient(channel),
                              Admission(f"{ROLE_NAMES[role]} {address}", *self._limits),
                              bootstrap_address=bootstrap_address)
        self._entries[address] = entry
        await self.refresh(entry)
        if entry.reported_role not in (common_pb2.INSTANCE_ROLE_UNSPECIFIED, role):  # a decode added as a prefill
            serves = ROLE_NAMES.get(entry.reported_role, str(entry.reported_role))
            await self.remove(address)
            raise FailedPrecondition(
                f"{address} serves a {serves} instance, not a {ROLE_NAMES[role]} one",
                reason=Reason.INSTANCE_ROLE_MISMATCH,
                metadata={"address": address, "role": ROLE_NAMES[role], "serves": serves})
        entry.poller = asyncio.create_task(self._poll(entry))
        return entry

    async def remove(self, address: str) -> None:
        entry = self._entries.pop(address, None)
        if entry is None:
            raise NotFound(f"no instance at {address}", reason=Reason.INSTANCE_NOT_FOUND, metadata={"address": address})
        if entry.poller:
            entry.poller.cancel()
        await entry.channel.close(grace=5.0)

    def gauge_samples(self):
        """Live gauges for /metrics: admission in flight / queued and health per instance."""
        for entry in self.list():
            labels = ("prefill" if entry.role == PREFILL else "decode", entry.address)
            yield "pdmesh_router_in_flight", labels, entry.admission.in_flight
            yield "pdmesh_router_queued", labels, entry.admission.queued
            yield "pdmesh_router_instance_healthy", labels, 1 if entry.healthy else 0

    def list(self) -> list[InstanceEntry]:
        return list(self._entries.values())

    async def refresh(self, entry: InstanceEntry) -> None:
        try:
            status = await entry.client.status(timeout=2.0)
        except PdmeshError as err:
            entry.slow_polls += err.code == grpc.StatusCode.DEADLINE_EXCEEDED
            if err.code == grpc.StatusCode.DEADLINE_EXCEEDED and entry.slow_polls < MAX_SLOW_POLLS:
                return  # busy, not gone: keep its state
            if entry.healthy:
                log.warning("instance %s unhealthy: %s", entry.address, err)
            entry.healthy = False
            return
        entry.slow_polls = 0
        entry.reported_role = status.role
        entry.instance_id = status.instance_id
        entry.dp_size = status.dp_size or len(status.ranks) or 1
        entry.load_balance_method = status.load_balance_method
        entry.bootstrap_address = status.bootstrap_address or entry.bootstrap_address
        entry.draining = status.draining
        entry.rank_loads = [r.active_requests for r in status.ranks]
        entry.healthy = (not status.draining and any(r.alive for r in status.ranks)
                         and status.role in (common_pb2.INSTANCE_ROLE_UNSPECIFIED, entry.role))

    async def _poll(self, entry: InstanceEntry) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            await self.refresh(entry)

    def choose(self, role: int) -> InstanceEntry:
        candidates = [e for e in self._entries.values() if e.role == role and e.healthy]
        if not candidates:
            raise Unavailable(f"no healthy {ROLE_NAMES[role]} instance; add one with AddInstance",
                              reason=Reason.NO_HEALTHY_INSTANCE, metadata={"role": ROLE_NAMES[role]})
        if self.policy == "least_outstanding":
            return min(candidates, key=lambda e: (e.outstanding, e.admission.queued))
        return candidates[next(self._counters[role]) % len(candidates)]

    def mark_draining(self, entry: InstanceEntry) -> None:
        """The instance refused a request because it drains: route around it from now on."""
        if entry.healthy:
            log.info("instance %s is draining; routing around it", entry.address)
        entry.draining, entry.healthy = True, False

    async def close(self) -> None:
        for address in list(self._entries):
            await self.remove(address)
