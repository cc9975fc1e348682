"""pdmesh.logs and pdmesh.metrics in one process: fields per task, formats, the RPC hook, fan-in."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdmesh import logs, metrics
from pdmesh.errors import FollowBootstrapRoomConflict, NotFound


def _logger(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger(f"pdmesh.test.{id(out)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, out


def test_bound_fields_stay_in_their_own_task_and_reach_every_line():
    logger, out = _logger(logs.KeyValueFormatter("%(message)s"))

    async def request(room: int, started: asyncio.Event, other: asyncio.Event) -> None:
        logs.bind(room=room, prefill_rank=room % 2)
        started.set()
        await other.wait()  # the other request binds its own room meanwhile
        logger.info("plain line")
        logs.event(logger, logging.INFO, "done", path="fast_path", note="two words")

    async def main() -> None:
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(request(11, a, b), request(12, b, a))
        logger.info("outside any request")

    asyncio.run(main())
    lines = out.getvalue().splitlines()
    assert sorted(lines[:4]) == sorted([
        "plain line room=11 prefill_rank=1", "plain line room=12 prefill_rank=0",
        'done room=11 prefill_rank=1 path=fast_path note="two words"',
        'done room=12 prefill_rank=0 path=fast_path note="two words"'])
    assert lines[4] == "outside any request"


def test_json_lines_carry_the_fields_as_keys():
    logger, out = _logger(logs.JsonFormatter("decode[1]"))

    async def request() -> None:
        logs.bind(room=2**63 - 1, decode_rank=1)
        logs.event(logger, logging.WARNING, "decode done", tokens=4)
    asyncio.run(request())
    record = json.loads(out.getvalue())
    assert record["msg"] == "decode done" and record["level"] == "WARNING"
    assert (record["room"], record["decode_rank"], record["tokens"], record["process"]) == \
        (2**63 - 1, 1, 4, "decode[1]")


def _value(name: str, **labels) -> float:
    from prometheus_client import REGISTRY
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_rpc_hook_counts_outcomes_failures_and_conflicts():
    handler = "UnitServicer.Call"
    with metrics.rpc(handler):
        pass
    with metrics.rpc(handler) as outcome:
        outcome.failed(NotFound("no such room", reason="ROOM_NOT_FOUND"))
    with metrics.rpc(handler) as outcome:
        outcome.failed(FollowBootstrapRoomConflict("rank 0 cannot hold room 3"))

    async def cancelled() -> None:
        with metrics.rpc(handler):
            raise asyncio.CancelledError
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancelled())
    assert _value("pdmesh_rpcs_total", handler=handler, code="OK") == 1
    assert _value("pdmesh_rpcs_total", handler=handler, code="NOT_FOUND") == 1
    assert _value("pdmesh_rpcs_total", handler=handler, code="CANCELLED") == 1
    assert _value("pdmesh_failures_total", handler=handler, code="FAILED_PRECONDITION",
                  reason="FOLLOW_BOOTSTRAP_ROOM_CONFLICT") == 1
    assert _value("pdmesh_conflicts_total", handler=handler) == 1
    assert _value("pdmesh_rpc_seconds_count", handler=handler) == 4


def _scrape(url: str) -> dict[tuple, float]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"series {key} appears twice"
            samples[key] = s.value
    return samples


def test_fan_in_labels_ranks_and_reports_a_silent_one_without_failing():
    rank = metrics.serve("127.0.0.1", 0)
    with socket.socket() as dead:  # a port that is bound but never answers HTTP
        dead.bind(("127.0.0.1", 0))
        dead.listen()
        fan_in = metrics.RankFanIn(lambda: [(0, rank.address), (1, "%s:%d" % dead.getsockname()),
                                            (2, "")])
        controller = metrics.serve("127.0.0.1", 0, registry=fan_in)
        try:
            for _ in range(2):  # a second scrape must not repeat any series
                got = _scrape(controller.url)
            ok = {dict(labels)["dp_rank"]: v for (name, labels), v in got.items()
                  if name == "pdmesh_rank_scrape_ok"}
            assert ok == {"0": 1.0, "1": 0.0, "2": 0.0}
            info = [dict(labels).get("dp_rank") for (name, labels) in got if name == "python_info"]
            assert sorted(info, key=str) == sorted([None, "0"], key=str)
        finally:
            controller.close()
            rank.close()


def test_a_metrics_port_already_taken_fails_at_start_with_the_reason():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            metrics.start("router", port, "127.0.0.1")
    assert metrics.start("router", None, "127.0.0.1") is None


def _pki(directory):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "security" / "pki.py"
    spec = importlib.util.spec_from_file_location("pdmesh_test_pki", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.make_pki(directory)


def test_with_mtls_the_endpoint_is_https_and_wants_a_certificate_of_the_mesh_ca(tmp_path):
    import ssl
    pki = _pki(tmp_path)
    server = metrics.serve("127.0.0.1", 0, tls=pki.node(mtls=True))
    try:
        assert server.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=pki.ca)
        with pytest.raises(OSError):  # no client certificate: the handshake fails
            urllib.request.urlopen(server.url, timeout=5, context=trusted).read()
        trusted.load_cert_chain(pki.client_cert, pki.client_key)
        with urllib.request.urlopen(server.url, timeout=5, context=trusted) as reply:
            assert reply.status == 200 and b"# TYPE pdmesh_rpcs_total counter" in reply.read()
    finally:
        server.close()
