"""Configuration of a worker instance (prefill or decode) and of each of its DP rank processes.

`InstanceConfig` is built once by `pdmesh prefill` / `pdmesh decode` from flags and `PDMESH_*`
variables; the controller derives one `RankConfig` per DP rank from it and hands it to the rank
process as JSON (the only thing a rank reads at start).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from pdmesh.errors import InvalidArgument
from pdmesh.reasons import Reason
from pdmesh.tls import TlsConfig
from pdmesh.worker.engine.factory import EngineSpec

PREFILL, DECODE = "prefill", "decode"


@dataclass(frozen=True)
class InstanceConfig:
    """One prefill or decode instance: a DP controller with `dp_size` rank processes."""

    role: str
    instance_id: str
    host: str = "127.0.0.1"
    port: int = 0
    dp_size: int = 1
    #: Prefill: round_robin | shortest_queue | follow_bootstrap_room. Decode: round_robin | shortest_queue.
    load_balance_method: str = "round_robin"
    #: Prefill: every rank registers every room, even under follow_bootstrap_room.
    force_query_prefill_dp_rank: bool = False
    #: Prefill: embed a bootstrap service on this port (0 = a free one) ...
    bootstrap_port: int | None = None
    #: ... or register at this external one (host:port). Decode: the bootstrap service whose
    #: prefill ranks each rank links to ahead of requests (worker/rank/prelink.py), or None.
    bootstrap_address: str | None = None
    #: The model every rank runs; prefill and decode must build the same one.
    engine: EngineSpec = field(default_factory=EngineSpec)
    #: Pages in each rank's KV pool.
    num_pages: int = 1024
    #: Seconds a prefill rank holds a computed room for the decode's transfer request.
    transfer_wait_s: float = 30.0
    #: Seconds a prefill rank waits for a room it was asked to send but does not hold yet (the
    #: decode often asks first; the prefill may be queued), and a decode rank waits for a looked-up
    #: room to be registered. Also bounded by the request's deadline.
    unknown_room_wait_s: float = 30.0
    #: Prefill: offer a room before computing it and send each layer's KV as soon as it is final
    #: (worker/rank/layer_stream.py); off: compute the whole prompt, then send.
    layer_streaming: bool = True
    #: Decode: cut each KV transfer into at least this many chunks of layers (fewer where the
    #: model has fewer layers); see TransferConfig.min_chunks.
    kv_min_chunks: int = 8
    #: Seconds a decode waits for free pages before RESOURCE_EXHAUSTED.
    page_wait_s: float = 5.0
    #: Most requests a rank serves at once; more wait in its queue.
    max_running_requests: int = 64
    #: UCX transports (UCX_TLS) for the data plane, e.g. "tcp" or "sm,self,tcp"; None = pdmesh's default.
    ucx_tls: str | None = None
    #: How KV moves between ranks: "auto" (same host: written straight into the decode's pool,
    #: which then lives in shared memory; UCX elsewhere) or "ucx" (always UCX).
    kv_transfer_path: str = "auto"
    #: CUDA devices for the ranks, one per rank or one for all ("" = none).
    devices: tuple[str, ...] = ()
    #: Decode, for tests: save each room's received prompt KV as <dir>/<room>.pt (PDMESH_DEBUG_KV_DIR).
    debug_kv_dir: str | None = None
    #: Prefill: the host its ranks' UCX listeners publish (decodes connect there for KV); the
    #: listeners bind every interface. Across hosts, an address the decodes can reach.
    transfer_host: str = "127.0.0.1"
    #: TLS of every server and client of the instance: the controller, its embedded bootstrap
    #: service, its rank processes' servers and every channel they open (None = plaintext).
    tls: TlsConfig | None = None
    #: Serve Prometheus /metrics (the controller's and every rank's) on this port (0 = a free
    #: one); None: no metrics endpoint, and the ranks serve none either.
    metrics_port: int | None = None
    #: Address of the /metrics endpoint; None: `host`.
    metrics_host: str | None = None

    def __post_init__(self) -> None:
        if self.role not in (PREFILL, DECODE):
            raise InvalidArgument(f"role must be prefill or decode, got {self.role!r}")
        if not self.instance_id:
            raise InvalidArgument("instance id must not be empty")
        if self.kv_transfer_path not in ("auto", "ucx"):
            raise InvalidArgument(f"kv_transfer_path must be auto or ucx, got {self.kv_transfer_path!r}",
                                  reason=Reason.INVALID_TRANSFER_PATH)
        if not 1 <= self.dp_size <= 1024:
            raise InvalidArgument(f"dp_size must be in 1..1024, got {self.dp_size}")
        if self.role == PREFILL and self.bootstrap_port is None and not self.bootstrap_address:
            raise InvalidArgument("a prefill needs --bootstrap-port (embedded) or --bootstrap-addr")


@dataclass(frozen=True)
class RankConfig:
    """What one DP rank process needs to start."""

    instance: InstanceConfig
    dp_rank: int
    #: The bootstrap service the rank registers rooms at (prefill), or whose prefill ranks it
    #: links to ahead of requests (decode; requests name their own bootstrap for lookups).
    bootstrap_address: str | None = None
    #: The instance's epoch, published in its instance info.
    epoch: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RankConfig":
        raw = json.loads(text)
        inst = raw["instance"]
        inst["engine"] = EngineSpec(**inst["engine"])
        inst["devices"] = tuple(inst.get("devices") or ())
        inst["tls"] = TlsConfig.from_dict(inst.get("tls"))
        raw["instance"] = InstanceConfig(**inst)
        return cls(**raw)
