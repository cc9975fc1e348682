"""`make bench` part `ttft`: time to first token of a PD pair beside one colocated engine, and the
cost of the control path for each rank path.

1. TTFT against prompt length with realistic KV geometry (the `bench-kv` preset: 32 layers,
   8 KV heads, head dim 128, bf16, 16-token pages; a thin body so the CPU can prefill it). The
   baseline is the same engine's prefill in this process (a colocated engine's TTFT). PD TTFT is
   measured from sending both requests to the decode's first token, so it holds prefill compute,
   the KV transfer and the whole control path.
2. Control path per rank path (tiny engine, 16-token prompts, so compute and bytes are small):
   TTFT minus the prefill's own compute time, p50 over many requests; and how many bootstrap
   lookups each path made (hint and fast path must make none).
"""

from __future__ import annotations

import asyncio

from bench.pd_client import PdClient, arun, percentile
from pdmesh.common.v1 import common_pb2
from testkit.proc import Proc, start_all, stop_all
from pdmesh.worker.engine.factory import EngineSpec, build_engine
from pdmesh.worker.engine.reference import time_colocated_prefill
from pdmesh.worker.engine.runtime import configure_torch_threads

LENGTHS = [128, 512, 2048]
QUICK_LENGTHS = [128, 512]


def _mesh(preset: str, num_pages: int, prefills: list[tuple[str, list[str], dict]]) -> tuple[Proc, list[Proc]]:
    boot = Proc("bench-bootstrap", ["bootstrap", "--port", "0"]).start()
    addr = boot.wait_ready()
    engine = ["--model-preset", preset, "--num-pages", str(num_pages)]
    procs = [Proc(name, ["prefill", "--instance-id", name, "--bootstrap-addr", addr, *args, *engine], env=env)
             for name, args, env in prefills]
    procs.append(Proc("bench-decode", ["decode", "--instance-id", "bench-decode", "--dp-size", "2", *engine]))
    return boot, start_all(procs)


def ttft_vs_length(lengths: list[int], repeats: int) -> list[str]:
    configure_torch_threads()
    engine = build_engine(EngineSpec(preset="bench-kv"))
    pages = engine.layout.pages_for_tokens(max(lengths)) + 4
    boot, procs = _mesh("bench-kv", pages, [("p-kv", ["--dp-size", "1"], {})])
    rows = ["| prompt tokens | KV MiB | colocated TTFT ms (p50) | PD TTFT ms (p50) | PD / colocated | added ms |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |"]

    async def measure() -> None:
        client = PdClient(procs[0].address, procs[1].address, boot.address, "p-kv")
        for n in lengths:
            ids = [(i * 7 + 3) % 250 + 1 for i in range(n)]
            colocated = percentile([t * 1e3 for t in time_colocated_prefill(engine, ids, repeats)], 50)
            await client.pair(ids)  # warm the connections and the ranks
            pd = percentile([(await client.pair(ids)).ttft_ms for _ in range(repeats)], 50)
            mib = engine.layout.request_bytes(engine.layout.pages_for_tokens(n)) / 2**20
            rows.append(f"| {n} | {mib:.0f} | {colocated:.1f} | {pd:.1f} | {pd / colocated:.2f} | {pd - colocated:.1f} |")
    try:
        arun(measure())
    finally:
        stop_all([*procs, boot])
    return rows


def control_path(requests: int) -> list[str]:
    boot, procs = _mesh("tiny", 256, [
        ("p-follow", ["--dp-size", "2", "--load-balance-method", "follow_bootstrap_room"], {}),
        ("p-force", ["--dp-size", "2", "--load-balance-method", "follow_bootstrap_room"],
         {"PDMESH_FORCE_QUERY_PREFILL_DP_RANK": "1"}),
        ("p-dp1", ["--dp-size", "1"], {})])
    decode = procs[-1].address
    cases = [("hint", "p-follow", 1), ("dp1", "p-dp1", None), ("fast_path", "p-follow", None),
             ("lookup", "p-force", None)]
    rows = ["| rank path | requests | TTFT ms p50 | prefill compute ms p50 | control path + transfer ms p50 | p99 | lookups made |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ids = list(range(1, 17))
    async def measure() -> None:
        for label, prefill, pin in cases:
            address = next(p.address for p in procs if p.name == prefill)
            client = PdClient(address, decode, boot.address, prefill)
            for _ in range(5):
                await client.pair(ids, pin=pin)
            results = [await client.pair(ids, pin=pin) for _ in range(requests)]
            ttft = [r.ttft_ms for r in results]
            control = [r.ttft_ms - r.prefill.compute_ms for r in results]
            lookups = sum(1 for r in results if r.routing.rank_path == common_pb2.RANK_PATH_LOOKUP)
            rows.append(f"| {label} | {requests} | {percentile(ttft, 50):.2f} | "
                        f"{percentile([r.prefill.compute_ms for r in results], 50):.2f} | "
                        f"{percentile(control, 50):.2f} | {percentile(control, 99):.2f} | {lookups} |")
    try:
        arun(measure())
    finally:
        stop_all([*procs, boot])
    return rows


def run(args) -> str:
    lengths = QUICK_LENGTHS if args.quick else LENGTHS
    table1 = ttft_vs_length(lengths, 2 if args.quick else 3)
    table2 = control_path(20 if args.quick else 100)
    return "\n".join([
        "TTFT of a prefill/decode pair (dp 1 each, separate processes) beside one colocated engine "
        "(the same `bench-kv` model: 32 layers, 8 KV heads, head dim 128, bf16) on this 2-core CPU. "
        "8k-token prompts take minutes per prefill on this CPU and are left to the GPU machine.", "",
        *table1, "",
        "Control path per rank path (tiny engine, 16-token prompts, one request at a time): "
        "TTFT minus the prefill's own compute, i.e. rank resolution, the UCX handshake, the "
        "transfer of ~20 KiB and two gRPC hops. `lookups made` counts requests whose decode asked "
        "the bootstrap service.", "", *table2])

