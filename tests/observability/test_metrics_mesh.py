"""Metrics and logs of a real mesh: every process's /metrics is scraped before and after traffic.

One mesh serves the module, each a separate process started as the README does, with
PDMESH_METRICS_PORT=0: a bootstrap service; three prefills (dp 2 follow_bootstrap_room, dp 2
round_robin, dp 1), so that every rank path occurs; one decode (dp 1, JSON logs); a router in
front of the follow_bootstrap_room prefill and the decode. Prompts are token ids, so the KV bytes
each transfer must move are known exactly from the layout, and EOS is ignored, so every request
makes exactly MAX_NEW tokens and the decode batch sizes add up to a known count.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import urllib.request
from collections import defaultdict

import grpc
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.common.v1 import common_pb2
from pdmesh.errors import PdmeshError
from pdmesh.router.client import RouterClient
from pdmesh.worker.engine.factory import EngineSpec, build_layout
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc
from procs import Proc, start_all, stop_all

MAX_NEW = 4
NUM_PAGES = 64
METRICS_LINE = re.compile(r"pdmesh \S+ metrics at (\S+)")
ENV = {"PDMESH_METRICS_PORT": "0", "PDMESH_LOG_LEVEL": "INFO"}


def metrics_url(proc: Proc, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(proc.lines):
            if match := METRICS_LINE.search(line):
                return match.group(1)
        time.sleep(0.05)
    raise AssertionError(f"{proc.name} printed no metrics line:\n{proc.tail()}")


@pytest.fixture(scope="module")
def mesh():
    boot = Proc("obs-bootstrap", ["bootstrap", "--port", "0"], env=ENV).start()
    boot_addr = boot.wait_ready()
    common = ["--num-pages", str(NUM_PAGES), "--bootstrap-addr", boot_addr]
    procs = [boot, *start_all([
        Proc("obs-p-follow", ["prefill", "--instance-id", "p-follow", "--dp-size", "2",
                              "--load-balance-method", "follow_bootstrap_room", *common], env=ENV),
        Proc("obs-p-rr", ["prefill", "--instance-id", "p-rr", "--dp-size", "2",
                          "--load-balance-method", "round_robin", *common], env=ENV),
        Proc("obs-p-dp1", ["prefill", "--instance-id", "p-dp1", "--dp-size", "1", *common], env=ENV),
        Proc("obs-decode", ["decode", "--instance-id", "d-0", "--num-pages", str(NUM_PAGES)],
             env={**ENV, "PDMESH_LOG_FORMAT": "json"}),
    ])]
    by_name = {p.name.removeprefix("obs-"): p for p in procs}
    try:
        router = Proc("obs-router", ["router", "--prefill", by_name["p-follow"].address,
                                     "--decode", by_name["decode"].address], env=ENV).start()
        router.wait_ready()
        by_name["router"] = router
        urls = {name: metrics_url(p) for name, p in by_name.items()}
        channels = {name: grpc.insecure_channel(by_name[name].address)
                    for name in ("p-follow", "p-rr", "p-dp1", "decode")}
        yield {"procs": by_name, "urls": urls, "channels": channels, "bootstrap": boot_addr}
        for channel in channels.values():
            channel.close()
    finally:
        stop_all(list(by_name.values()))


# --- scraping --------------------------------------------------------------------------------

class Scrape:
    """One scrape of one endpoint: samples by name, each with its labels."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, list[tuple[dict, float]]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[s.name].append((s.labels, s.value))

    def value(self, name: str, **labels) -> float:
        """The sum of `name` over every series whose labels include `labels`."""
        want = {k: str(v) for k, v in labels.items()}
        return sum(v for lab, v in self.samples.get(name, []) if want.items() <= lab.items())

    def series(self, name: str) -> list[tuple[dict, float]]:
        return self.samples.get(name, [])


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return Scrape(reply.read().decode())


def scrape_all(mesh) -> dict[str, Scrape]:
    return {name: scrape(url) for name, url in mesh["urls"].items()}


# --- traffic -------------------------------------------------------------------------------------

def token_prompt(length: int) -> worker_pb2.Prompt:
    return worker_pb2.Prompt(token_ids=worker_pb2.TokenIds(ids=[(7 * i) % 200 + 3 for i in range(length)]))


def call_pair(mesh, prefill: str, length: int, *, room: int | None = None, hint: int | None = None):
    """One room to a prefill and the decode at once; the decode's messages (PdmeshError if failed)."""
    room = room or secrets.randbits(63) or 1
    token = secrets.token_bytes(16)
    sampling = common_pb2.SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    p_req = worker_pb2.PrefillRequest(bootstrap_room=room, prompt=token_prompt(length), sampling=sampling,
                                      transfer_token=token)
    d_req = worker_pb2.DecodeRequest(bootstrap_room=room, prompt=token_prompt(length), sampling=sampling,
                                     prefill_instance_id=prefill, prefill_bootstrap_address=mesh["bootstrap"],
                                     transfer_token=token)
    if hint is not None:  # pinned as the router pins: to the prefill as routed rank and hint
        p_req.routed_dp_rank = p_req.disagg_prefill_dp_rank = d_req.disagg_prefill_dp_rank = hint
    p_future = worker_pb2_grpc.PrefillServiceStub(mesh["channels"][prefill]).Prefill.future(p_req, timeout=60)
    d_call = worker_pb2_grpc.DecodeServiceStub(mesh["channels"]["decode"]).Decode(d_req, timeout=60)
    try:
        messages = list(d_call)
        p_future.result()
    except grpc.RpcError as err:
        raise PdmeshError.from_rpc_error(err) from None
    return room, messages


def kv_bytes(length: int) -> int:
    layout = build_layout(EngineSpec())
    return layout.request_bytes(layout.pages_for_tokens(length))


async def through_router(address: str, lengths: list[int]):
    async with RouterClient(address) as client:
        return await asyncio.gather(*(client.generate(list(token_prompt(n).token_ids.ids),
                                                      max_new_tokens=MAX_NEW, ignore_eos=True)
                                      for n in lengths))


@pytest.fixture(scope="module")
def traffic(mesh):
    """Scrape, send known traffic (every rank path, a forced conflict), scrape again."""
    before = scrape_all(mesh)
    router_lengths = [5, 17, 33, 40]
    samples = asyncio.run(through_router(mesh["procs"]["router"].address, router_lengths))
    direct = {"hint": [("p-follow", 9, 0), ("p-follow", 21, 1)],
              "lookup": [("p-rr", 12, None), ("p-rr", 30, None), ("p-rr", 16, None)],
              "dp1": [("p-dp1", 25, None)]}
    rooms = {path: [call_pair(mesh, p, n, hint=h)[0] for p, n, h in calls] for path, calls in direct.items()}
    conflict_room = 2 * secrets.randbits(40) + 1  # follow_bootstrap_room implies rank 1; pin rank 0
    conflict = worker_pb2.PrefillRequest(bootstrap_room=conflict_room, routed_dp_rank=0,
                                         transfer_token=b"k" * 16, prompt=token_prompt(8))
    with pytest.raises(grpc.RpcError) as err:
        worker_pb2_grpc.PrefillServiceStub(mesh["channels"]["p-follow"]).Prefill(conflict, timeout=20)
    assert PdmeshError.from_rpc_error(err.value).reason == "FOLLOW_BOOTSTRAP_ROOM_CONFLICT"
    lengths = router_lengths + [n for calls in direct.values() for _, n, _ in calls]
    return {"before": before, "after": scrape_all(mesh), "samples": samples, "rooms": rooms,
            "conflict_room": conflict_room, "lengths": lengths, "router_lengths": router_lengths}


# --- tests ---------------------------------------------------------------------------------------

def test_every_process_serves_metrics_with_ranks_labelled(mesh):
    got = scrape_all(mesh)
    assert got["bootstrap"].value("pdmesh_bootstrap_instances") == 3
    for name, dp in (("p-follow", 2), ("p-rr", 2), ("p-dp1", 1), ("decode", 1)):
        s = got[name]
        ranks = {lab["dp_rank"]: v for lab, v in s.series("pdmesh_kv_pages_total")}
        assert ranks == {str(r): NUM_PAGES for r in range(dp)}, (name, ranks)
        assert {lab["dp_rank"]: v for lab, v in s.series("pdmesh_rank_scrape_ok")} == \
            {str(r): 1 for r in range(dp)}, name
        assert s.value("pdmesh_rank_up") == dp
        # each rank's own process metrics come through the controller, labelled
        assert {lab.get("dp_rank") for lab, _ in s.series("process_resident_memory_bytes")} == \
            {None, *map(str, range(dp))}, name
    healthy = got["router"].series("pdmesh_router_instance_healthy")
    assert sorted((lab["role"], v) for lab, v in healthy) == [("decode", 1.0), ("prefill", 1.0)]


def test_the_merged_exposition_is_valid_openmetrics(mesh):
    request = urllib.request.Request(mesh["urls"]["p-follow"],
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        text = reply.read().decode()
    names = [f.name for f in parse_openmetrics(text)]  # raises on a repeated or interleaved family
    assert len(names) == len(set(names)) and "pdmesh_rank_requests" in names


def test_rank_path_counters_move_by_the_requests_sent(traffic):
    b, a = traffic["before"], traffic["after"]
    n_router = len(traffic["router_lengths"])
    assert {s.rank_path for s in traffic["samples"]} == {"fast_path"}

    def delta(name, metric, **labels):
        return a[name].value(metric, **labels) - b[name].value(metric, **labels)

    expect = {"fast_path": ("p-follow", n_router), "hint": ("p-follow", 2), "lookup": ("p-rr", 3),
              "dp1": ("p-dp1", 1)}
    for path, (prefill, n) in expect.items():
        assert delta(prefill, "pdmesh_rank_requests_total", role="prefill", path=path) == n, path
        assert delta("decode", "pdmesh_rank_requests_total", role="decode", path=path) == n, path
    assert delta("decode", "pdmesh_decode_resolve_seconds_count", path="lookup") == 3
    assert delta("router", "pdmesh_router_samples_total", path="fast_path", code="OK") == n_router
    assert delta("router", "pdmesh_router_ttft_seconds_count") == n_router
    assert delta("router", "pdmesh_rpcs_total", handler="RouterServicer.Generate", code="OK") == n_router
    assert delta("bootstrap", "pdmesh_bootstrap_rooms_registered_total") == 3  # the lookup path only
    looked_up = sum(delta("bootstrap", "pdmesh_bootstrap_lookups_total", rpc="WatchRooms", result=r)
                    for r in ("found", "waited"))
    assert looked_up == 3


def test_transfer_bytes_grow_by_the_kv_bytes_of_each_request(traffic):
    b, a = traffic["before"], traffic["after"]
    expected = sum(kv_bytes(n) for n in traffic["lengths"])
    sent = sum(a[p].value("pdmesh_transfer_bytes_total", side="send")
               - b[p].value("pdmesh_transfer_bytes_total", side="send") for p in ("p-follow", "p-rr", "p-dp1"))
    received = a["decode"].value("pdmesh_transfer_bytes_total", side="receive") - \
        b["decode"].value("pdmesh_transfer_bytes_total", side="receive")
    assert sent == received == expected > 0
    n = len(traffic["lengths"])
    assert a["decode"].value("pdmesh_transfer_seconds_count") - b["decode"].value("pdmesh_transfer_seconds_count") == n
    assert a["decode"].value("pdmesh_transfers_total", result="ok") - \
        b["decode"].value("pdmesh_transfers_total", result="ok") == n
    assert a["decode"].value("pdmesh_transfers_total", result="error") == 0
    # every step advances each running sequence one token: the batch sizes add up to the tokens
    steps = a["decode"].value("pdmesh_decode_batch_size_sum") - b["decode"].value("pdmesh_decode_batch_size_sum")
    assert steps == n * (MAX_NEW - 1)


def test_a_forced_conflict_is_counted_where_it_was_answered(traffic):
    b, a = traffic["before"], traffic["after"]
    for handler in ("PrefillRankService.Prefill", "PrefillControllerService.Prefill"):
        assert a["p-follow"].value("pdmesh_conflicts_total", handler=handler) - \
            b["p-follow"].value("pdmesh_conflicts_total", handler=handler) == 1, handler
        assert a["p-follow"].value("pdmesh_failures_total", handler=handler, code="FAILED_PRECONDITION",
                                   reason="FOLLOW_BOOTSTRAP_ROOM_CONFLICT") - \
            b["p-follow"].value("pdmesh_failures_total", handler=handler,
                                reason="FOLLOW_BOOTSTRAP_ROOM_CONFLICT") == 1, handler
    ranks = {lab["dp_rank"]: v for lab, v in a["p-follow"].series("pdmesh_conflicts_total")
             if lab["handler"] == "PrefillRankService.Prefill"}
    assert ranks.get("0") == 1  # the rank that was pinned answered it


def test_pools_and_queues_are_back_to_empty_after_the_traffic(mesh, traffic):
    deadline = time.monotonic() + 10
    while True:
        now = scrape_all(mesh)
        idle = all(s.value("pdmesh_kv_pages_free") == s.value("pdmesh_kv_pages_total") > 0
                   and s.value("pdmesh_rank_active_requests") == 0
                   and s.value("pdmesh_controller_in_flight") == 0
                   for name, s in now.items() if name not in ("router", "bootstrap"))
        idle = idle and now["router"].value("pdmesh_router_in_flight") == 0 \
            and now["router"].value("pdmesh_router_queued") == 0 \
            and now["bootstrap"].value("pdmesh_bootstrap_waiters") == 0
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert idle, {name: (s.series("pdmesh_kv_pages_free"), s.series("pdmesh_rank_active_requests"))
                  for name, s in now.items()}


def wait_for_line(proc: Proc, *needles: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(proc.lines):
            if all(n in line for n in needles):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no line of {proc.name} has {needles}:\n{proc.tail(40)}")


def test_request_log_lines_carry_the_room_and_ranks(mesh, traffic):
    procs = mesh["procs"]
    sample = traffic["samples"][0]
    room, routing = sample.info.bootstrap_room, sample.info.routing
    line = wait_for_line(procs["router"], "sample done", f"room={room} ")
    assert f"prefill_rank={routing.prefill_dp_rank}" in line and f"decode_rank={routing.decode_dp_rank}" in line
    assert "path=fast_path" in line
    line = wait_for_line(procs["p-follow"], "prefill done", f"room={room} ")
    assert f"prefill_rank={routing.prefill_dp_rank}" in line and "path=fast_path" in line
    line = wait_for_line(procs["decode"], '"decode done"', f'"room": {room},')
    record = json.loads(line[line.index("{"):])
    assert (record["room"], record["prefill_rank"], record["decode_rank"], record["path"]) == \
        (room, routing.prefill_dp_rank, routing.decode_dp_rank, "fast_path")
    lookup_room = traffic["rooms"]["lookup"][0]
    record = json.loads(wait_for_line(procs["decode"], '"decode done"', f'"room": {lookup_room},'))
    assert record["path"] == "lookup" and record["prefill_instance"] == "p-rr"
    line = wait_for_line(procs["p-follow"], "rpc failed", f"room={traffic['conflict_room']} ",
                         "handler=PrefillRankService.Prefill")
    assert "reason=FOLLOW_BOOTSTRAP_ROOM_CONFLICT" in line and "prefill_rank=0" in line
