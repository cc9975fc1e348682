"""Prometheus metrics of every pdmesh process: the catalogue, the `/metrics` endpoint, rank fan-in.

Every metric pdmesh exports is defined here (names start `pdmesh_`; the README lists them), so
one file says what exists and what each label means. Code that counts imports the object and
calls it; gauges of live state (pool pages, queues, registry sizes) are not updated by the code
that changes the state: the owner registers itself as a *source* (`track(owner,
Owner.gauge_samples)`, its own method, read at scrape time), so a gauge can never drift from the
state it describes and this module knows nothing of the services' insides.

Serving (`pdmesh.metrics_http`, re-exported here): `serve(host, port)` starts prometheus-client's HTTP server in a daemon thread (port 0
picks a free one; a port already taken fails at start). Each process kind exposes one endpoint
when started with `--metrics-port` / `PDMESH_METRICS_PORT` (off by default: a fixed default port
would collide when several instances share a host, which every test and `pdmesh up` do).

DP ranks are separate processes. Each rank serves its own registry on a loopback port that it
reports in its readiness line; the instance's controller serves one `/metrics` with its own
metrics and every rank's, each rank sample labelled `dp_rank`, families of the same name merged
(`RankFanIn`). So an operator scrapes one target per instance, a rank restart shows up as a
counter reset of that `dp_rank` series only, and a rank that does not answer within
`metrics_http.RANK_SCRAPE_TIMEOUT_S` reads `pdmesh_rank_scrape_ok{dp_rank} 0` instead of stalling the scrape.
(prometheus-client's multiprocess mode was the alternative; it keeps per-pid files, has no live
gauges from callbacks and leaves dead ranks' files behind, so fan-in over loopback it is.)

Failures are counted in one place, `grpcutil.translate_errors`, through `rpc(handler)`: every
RPC of every service counts its outcome (`pdmesh_rpcs_total{handler,code}`), and a typed failure
also counts `pdmesh_failures_total{handler,code,reason}` (and `pdmesh_conflicts_total` for
FOLLOW_BOOTSTRAP_ROOM_CONFLICT), where `handler` is the servicer method (`PrefillRankService.Prefill`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pdmesh.reasons import Reason


log = logging.getLogger(__name__)
disable_created_metrics()  # no `*_created` series: half the lines, nothing lost for rates

RANK_PATHS = ("hint", "dp1", "fast_path", "lookup")
CONFLICT_REASON = Reason.FOLLOW_BOOTSTRAP_ROOM_CONFLICT
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# --- every service -------------------------------------------------------------------------------
RPCS = Counter("pdmesh_rpcs", "RPCs answered, by servicer method and status code", ["handler", "code"])
RPC_SECONDS = Histogram("pdmesh_rpc_seconds", "Time from an RPC's start to its answer (whole stream "
                        "for streaming RPCs)", ["handler"], buckets=_FAST)
FAILURES = Counter("pdmesh_failures", "Typed failures answered, by servicer method, code and "
                   "ErrorInfo reason", ["handler", "code", "reason"])
CONFLICTS = Counter("pdmesh_conflicts", "FOLLOW_BOOTSTRAP_ROOM_CONFLICT failures answered, by "
                    "servicer method", ["handler"])

# --- workers (rank processes; the controller adds dp_rank). Not registered here: see GROUPS ---------
_OFF = {"registry": None}
RANK_REQUESTS = Counter(
    "pdmesh_rank_requests", "Requests a DP rank served, by role and rank path (prefill: counted "
    "when the KV was sent; decode: when the KV arrived)", ["role", "path"], **_OFF)
DECODE_RESOLVE_SECONDS = Histogram(
    "pdmesh_decode_resolve_seconds", "Decode: time to resolve the prefill DP rank (instance info "
    "and, on the lookup path, the bootstrap wait), by rank path", ["path"], buckets=_FAST, **_OFF)
TRANSFER_BYTES = Counter(
    "pdmesh_transfer_bytes", "KV bytes moved by completed transfers (side=send on prefill ranks, "
    "receive on decode ranks)", ["side"], **_OFF)
TRANSFERS = Counter("pdmesh_transfers", "KV transfers ended, by side and result (ok|error)",
                    ["side", "result"], **_OFF)
TRANSFER_SECONDS = Histogram(
    "pdmesh_transfer_seconds", "Completed transfers: from the offer (send) or the request "
    "(receive) to the last byte, waiting for the peer included", ["side"], buckets=_FAST, **_OFF)
DECODE_BATCH = Histogram("pdmesh_decode_batch_size", "Sequences advanced by one decode step",
                         buckets=_BATCH, **_OFF)

# --- router --------------------------------------------------------------------------------------
ROUTER_TTFT = Histogram("pdmesh_router_ttft_seconds", "Router: time from Generate to a sample's "
                        "first token", buckets=_FAST, **_OFF)
ROUTER_SAMPLES = Counter(
    "pdmesh_router_samples", "Router: samples ended, by rank path (\"none\" when it failed "
    "before its first token) and code", ["path", "code"], **_OFF)

# --- bootstrap service ---------------------------------------------------------------------------
BOOTSTRAP_ROOMS_REGISTERED = Counter(
    "pdmesh_bootstrap_rooms_registered", "Bootstrap: room records created (idempotent retries "
    "not counted)", **_OFF)
BOOTSTRAP_LOOKUPS = Counter(
    "pdmesh_bootstrap_lookups", "Bootstrap: rooms looked up, by RPC and result (found at once, "
    "missing, invalid)", ["rpc", "result"], **_OFF)
BOOTSTRAP_WAIT_SECONDS = Histogram(
    "pdmesh_bootstrap_wait_seconds", "Bootstrap: how long a lookup waited for its room, by RPC "
    "and result (registered|expired)", ["rpc", "result"], buckets=_FAST, **_OFF)

#: Gauges read from sources at scrape time: name -> (help, label names).
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pdmesh_kv_pages_free": ("Free pages in a rank's KV pool", ("role",)),
    "pdmesh_kv_pages_total": ("Pages in a rank's KV pool", ("role",)),
    "pdmesh_rank_active_requests": ("Rooms a rank is working on now", ("role",)),
    "pdmesh_decode_running": ("Sequences in a decode rank's continuous batch", ()),
    "pdmesh_controller_in_flight": ("Requests the controller has forwarded to a rank and not "
                                    "seen end", ("role", "dp_rank")),
    "pdmesh_rank_up": ("1 when the rank process is up and ready", ("role", "dp_rank")),
    "pdmesh_rank_restarts": ("Times the controller restarted the rank", ("role", "dp_rank")),
    "pdmesh_rank_scrape_ok": ("1 when the rank's metrics were read for this scrape", ("dp_rank",)),
    "pdmesh_router_in_flight": ("Router: requests holding an admission slot of an instance",
                                ("role", "instance")),
    "pdmesh_router_queued": ("Router: requests queued for an admission slot of an instance",
                             ("role", "instance")),
    "pdmesh_router_instance_healthy": ("Router: 1 when the instance is healthy and chosen",
                                       ("role", "instance")),
    "pdmesh_bootstrap_rooms": ("Bootstrap: live room records", ()),
    "pdmesh_bootstrap_waiters": ("Bootstrap: lookups waiting for a room", ()),
    "pdmesh_bootstrap_instances": ("Bootstrap: registered prefill instances", ()),
    "pdmesh_bootstrap_open_streams": ("Bootstrap: WatchRooms lookup streams open now", ()),
}

GaugeSample = tuple[str, tuple[str, ...], float]
Source = Callable[[Any], Iterable[GaugeSample]]


class _Sources(Collector):
    """Live gauges: each registered (owner, function) yields samples when scraped.

    Owners are held weakly, so a forgotten service drops out by itself. Samples with the same
    name and labels from several owners (two services in one test process) are summed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[int, tuple[weakref.ref, Source]] = {}
        self._next = 0

    def add(self, owner: Any, source: Source) -> int:
        with self._lock:
            self._next += 1
            self._items[self._next] = (weakref.ref(owner), source)
            return self._next

    def remove(self, key: int) -> None:
        with self._lock:
            self._items.pop(key, None)

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            items = list(self._items.items())
        values: dict[str, dict[tuple[str, ...], float]] = {}
        for key, (ref, source) in items:
            owner = ref()
            if owner is None:
                self.remove(key)
                continue
            try:
                for name, labels, value in source(owner):
                    series = values.setdefault(name, {})
                    series[labels] = series.get(labels, 0.0) + float(value)
            except Exception:  # a scrape must never fail because one owner is mid-change
                log.debug("metrics source %r failed", source, exc_info=True)
        for name, series in values.items():
            help_text, label_names = GAUGES[name]
            family = GaugeMetricFamily(name, help_text, labels=label_names)
            for labels, value in series.items():
                family.add_metric(labels, value)
            yield family


SOURCES = _Sources()
REGISTRY.register(SOURCES)

#: Metrics of one process kind, exported (registered) only by processes of that kind, so a router
#: shows no always-zero bootstrap counters. Counting into a group that is not exported is harmless.
GROUPS = {
    "rank": (RANK_REQUESTS, DECODE_RESOLVE_SECONDS, TRANSFER_BYTES, TRANSFERS, TRANSFER_SECONDS,
             DECODE_BATCH),
    "router": (ROUTER_TTFT, ROUTER_SAMPLES),
    "bootstrap": (BOOTSTRAP_ROOMS_REGISTERED, BOOTSTRAP_LOOKUPS, BOOTSTRAP_WAIT_SECONDS),
}
_enabled: set[str] = set()
_enable_lock = threading.Lock()


def enable(group: str) -> None:
    """Export the metrics of `group` from this process (idempotent; `track_*` call it)."""
    with _enable_lock:
        if group not in _enabled:
            for collector in GROUPS[group]:
                REGISTRY.register(collector)
            _enabled.add(group)


def track(owner: Any, source: Source) -> Callable[[], None]:
    """Read `source(owner)` at every scrape (while `owner` lives); returns a function that stops it."""
    key = SOURCES.add(owner, source)
    return lambda: SOURCES.remove(key)


# --- the RPC hook --------------------------------------------------------------------------------

_RPC_CHILDREN: dict[str, tuple[Any, dict[str, Any]]] = {}  # handler -> (histogram, code -> counter)


class RpcOutcome:
    """`with rpc(handler) as outcome:` counts and times one RPC; the servicer wrapper reports a
    typed failure with `outcome.failed(error)`; an RPC cancelled or closed counts as CANCELLED.
    A class, not a generator context manager, with label children cached: a few µs per RPC."""

    __slots__ = ("handler", "code", "_started", "_seconds", "_counts")

    def __init__(self, handler: str) -> None:
        children = _RPC_CHILDREN.get(handler)
        if children is None:
            children = _RPC_CHILDREN[handler] = (RPC_SECONDS.labels(handler), {})
        self._seconds, self._counts = children
        self.handler = handler
        self.code = "OK"

    def __enter__(self) -> "RpcOutcome":
        self._started = time.perf_counter()
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None and self.code == "OK":
            self.code = "CANCELLED" if issubclass(kind, (asyncio.CancelledError, GeneratorExit)) \
                else "UNKNOWN"
        self._seconds.observe(time.perf_counter() - self._started)
        counter = self._counts.get(self.code)
        if counter is None:
            counter = self._counts[self.code] = RPCS.labels(self.handler, self.code)
        counter.inc()
        return False

    def failed(self, error) -> None:
        """Count a typed failure (a `PdmeshError`) answered by this RPC."""
        self.code = error.code.name
        FAILURES.labels(self.handler, self.code, error.reason).inc()
        if error.reason == CONFLICT_REASON:
            CONFLICTS.labels(self.handler).inc()


rpc = RpcOutcome


def path_name(path: int) -> str:
    """A `common.v1.RankPath` value -> `hint` | `dp1` | `fast_path` | `lookup` (or `unspecified`)."""
    from pdmesh.common.v1 import common_pb2
    return common_pb2.RankPath.Name(path).removeprefix("RANK_PATH_").lower()


def transfer_done(side: str, nbytes: int, seconds: float, ok: bool) -> None:
    """Count one ended transfer (bytes and time only when it completed)."""
    TRANSFERS.labels(side, "ok" if ok else "error").inc()
    if ok:
        TRANSFER_BYTES.labels(side).inc(nbytes)
        TRANSFER_SECONDS.labels(side).observe(seconds)


# --- what a service registers ------------------------------------------------------------------
# Each service owns its live gauges: it enables its group and tracks itself with a method that
# yields (name, labels, value) samples of the catalogue above (`metrics.track(owner, Cls.gauge_samples)`).

def prepare_rank(role: str) -> None:
    """A rank's counters read 0 before their first event, never absent (every rank path, both
    transfer results)."""
    enable("rank")
    for path in RANK_PATHS:
        RANK_REQUESTS.labels(role, path)
    side = "send" if role == "prefill" else "receive"
    TRANSFER_BYTES.labels(side)
    for result in ("ok", "error"):
        TRANSFERS.labels(side, result)


# The /metrics endpoint, its flags and the controller's rank fan-in live in pdmesh.metrics_http;
# re-exported so every service reaches metrics through this one module.
from pdmesh.metrics_http import (MetricsServer, RankFanIn, add_arguments, announce,  # noqa: E402
                                 controller_fan_in, serve, start)
