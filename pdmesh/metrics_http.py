"""The `/metrics` endpoint of a pdmesh process, its flags, and a controller's fan-in of its ranks.

`start(kind, port, host, tls=...)` is what an entry point calls (None when metrics are off);
`serve` runs prometheus-client's HTTP server in a daemon thread (HTTPS, and mTLS, with the
process's TLS config); `RankFanIn` is the registry a DP controller serves: its own metrics plus
every rank's, read from the ranks' loopback endpoints in parallel at scrape time and labelled
`dp_rank`. The metric catalogue is `pdmesh.metrics`.
"""

from __future__ import annotations

import logging
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families


log = logging.getLogger(__name__)
RANK_SCRAPE_TIMEOUT_S = 1.0


class RankFanIn(CollectorRegistry):
    """The controller's registry: its own metrics plus every rank's, labelled `dp_rank`.

    `ranks()` returns (dp_rank, "host:port" of the rank's metrics endpoint or "") pairs.
    """

    def __init__(self, ranks: Callable[[], Iterable[tuple[int, str]]]) -> None:
        super().__init__(auto_describe=False)
        self._ranks = ranks

    def collect(self):
        merged: dict[str, Metric] = {}
        for family in REGISTRY.collect():  # copies: some collectors yield the same object each time
            if family.name not in merged:
                merged[family.name] = copy = Metric(family.name, family.documentation, family.type,
                                                    family.unit)
                copy.samples = list(family.samples)
        ranks = list(self._ranks())
        with ThreadPoolExecutor(max_workers=max(1, len(ranks))) as pool:  # in parallel: one slow
            texts = list(pool.map(_fetch, [address for _, address in ranks]))  # rank costs 1 s
        from pdmesh.metrics import GAUGES  # here: pdmesh.metrics imports this module at its end
        scraped = GaugeMetricFamily("pdmesh_rank_scrape_ok", GAUGES["pdmesh_rank_scrape_ok"][0],
                                    labels=("dp_rank",))
        for (dp_rank, _), text in zip(ranks, texts):
            ok = text is not None
            if ok:
                try:
                    _merge(merged, dp_rank, text)
                except ValueError as exc:  # an unparsable answer: report the rank, keep the scrape
                    log.debug("metrics of rank %d: %s", dp_rank, exc)
                    ok = False
            scraped.add_metric((str(dp_rank),), 1 if ok else 0)
        merged[scraped.name] = scraped
        yield from merged.values()


def _fetch(address: str) -> str | None:
    """A rank's exposition, or None when it has none or does not answer in time."""
    if not address:
        return None
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=RANK_SCRAPE_TIMEOUT_S) as reply:
            return reply.read().decode()
    except (OSError, ValueError) as exc:  # a dead, stopped or restarting rank
        log.debug("metrics of the rank at %s: %s", address, exc)
        return None


def _merge(merged: dict[str, Metric], dp_rank: int, text: str) -> None:
    families = list(text_string_to_metric_families(text))  # parse all before merging any
    for family in families:
        samples = [s._replace(labels={**s.labels, "dp_rank": str(dp_rank)}) for s in family.samples]
        target = merged.get(family.name)
        if target is None:
            family.samples = samples
            merged[family.name] = family
        else:
            target.samples.extend(samples)


def controller_fan_in(controller) -> RankFanIn:
    """The fan-in registry of an instance's `Controller`: ranks that are up and serve metrics."""
    def ranks() -> list[tuple[int, str]]:
        return [(r.dp_rank, r.endpoint.metrics_address if r.alive and r.endpoint else "")
                for r in controller.ranks]
    return RankFanIn(ranks)


@dataclass
class MetricsServer:
    """A running `/metrics` endpoint."""

    host: str
    port: int
    _server: Any

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}/metrics"

    tls: bool = False

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(host: str, port: int, *, registry: CollectorRegistry = REGISTRY, tls=None) -> MetricsServer:
    """Serve `/metrics` on host:port (port 0: a free one) in a daemon thread.

    `tls` is the process's `pdmesh.tls.TlsConfig`: with a certificate the endpoint is HTTPS, and
    under mTLS it asks scrapers for a certificate of the same CA. OSError if the port is taken.
    """
    kwargs = {}
    if tls is not None and getattr(tls, "cert_file", None):
        kwargs = dict(certfile=tls.cert_file, keyfile=tls.key_file, client_cafile=tls.ca_file,
                      client_auth_required=bool(tls.require_client_cert))
    server, _ = start_http_server(port, addr=host, registry=registry, **kwargs)
    return MetricsServer(host, server.server_port, server, tls=bool(kwargs))


def add_arguments(parser) -> None:
    """`--metrics-port` and `--metrics-host` (env `PDMESH_METRICS_PORT` / `PDMESH_METRICS_HOST`)."""
    from pdmesh.config import env
    port = env("METRICS_PORT", "")
    parser.add_argument("--metrics-port", type=int, default=int(port) if port.strip() else None,
                        help="serve Prometheus /metrics on this port (0 = a free one, printed at "
                             "start; env PDMESH_METRICS_PORT; default: off)")
    parser.add_argument("--metrics-host", default=env("METRICS_HOST"),
                        help="address of the /metrics endpoint (env PDMESH_METRICS_HOST; default: "
                             "the service's --host)")


def announce(kind: str, server: MetricsServer) -> None:
    """The one line a process prints when its endpoint is up (tests and operators read it)."""
    print(f"pdmesh {kind} metrics at {server.url}", flush=True)


def start(kind: str, port: int | None, host: str, *, tls=None,
          registry: CollectorRegistry = REGISTRY) -> MetricsServer | None:
    """An entry point's endpoint: None when `port` is None (metrics off); else serve and announce.

    A port that cannot be taken ends the process at start with the reason (exit code 1).
    """
    if port is None:
        return None
    try:
        server = serve(host, port, registry=registry, tls=tls)
    except OSError as exc:
        raise SystemExit(f"pdmesh {kind}: cannot serve metrics on {host}:{port}: {exc}") from None
    announce(kind, server)
    return server
