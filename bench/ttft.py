"""`make bench` part `ttft`: time to first token of a PD pair beside one colocated engine, and the
cost of the control path for each rank path.

1. TTFT against prompt length with realistic KV geometry (the `bench-kv` preset: 32 layers,
   8 KV heads, head dim 128, bf16, 16-token pages; a thin body so the CPU can prefill it). The
   baseline is the same engine's prefill in this process (a colocated engine's TTFT). PD TTFT is
   measured from sending both requests to the decode's first token, so it holds prefill compute,
   the KV transfer and the whole control path; PD runs without and with layer streaming
   (two prefill instances, one decode), plotted to docs/ttft-streaming.png.
   Then the first request of a fresh mesh against its steady state, ranks warmed up or not.
2. Control path per rank path (tiny engine, 16-token prompts, so compute and bytes are small):
   TTFT minus the prefill's own compute time, p50 over many requests; and how many bootstrap
   lookups each path made (hint and fast path must make none).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.pd_client import PdClient, arun, percentile
from pdmesh.common.v1 import common_pb2
from testkit.proc import Proc, start_all, stop_all
from pdmesh.worker.engine.factory import EngineSpec, build_engine
from pdmesh.worker.engine.reference import time_colocated_prefill
from pdmesh.worker.engine.runtime import configure_torch_threads

LENGTHS = [128, 512, 2048]
QUICK_LENGTHS = [128, 512, 2048]
PLOT = Path(__file__).resolve().parent.parent / "docs" / "ttft-streaming.png"


def _mesh(preset: str, num_pages: int, prefills: list[tuple[str, list[str], dict]],
          decode_dp: int = 2, env: dict | None = None) -> tuple[Proc, list[Proc]]:
    boot = Proc("bench-bootstrap", ["bootstrap", "--port", "0"]).start()
    addr = boot.wait_ready()
    engine = ["--model-preset", preset, "--num-pages", str(num_pages)]
    procs = start_all([Proc(name, ["prefill", "--instance-id", name, "--bootstrap-addr", addr, *args,
                                   *engine], env={**(env or {}), **penv})
                       for name, args, penv in prefills])
    # the decode knows the bootstrap: its ranks link to the prefill ranks before it reports ready
    decode = Proc("bench-decode", ["decode", "--instance-id", "bench-decode", "--dp-size",
                                   str(decode_dp), "--bootstrap-addr", addr, *engine], env=env)
    return boot, procs + start_all([decode])


def _prompt(n: int) -> list[int]:
    return [(i * 7 + 3) % 250 + 1 for i in range(n)]


def ttft_vs_length(lengths: list[int], repeats: int, device: str = "cpu"
                   ) -> tuple[list[str], dict]:
    """Colocated prefill vs PD without and with layer streaming, same decode, same requests;
    every engine (this process's and the ranks') on `device`."""
    configure_torch_threads()
    engine = build_engine(EngineSpec(preset="bench-kv", device=device))
    pages = engine.layout.pages_for_tokens(max(lengths)) + 4
    env = {"PDMESH_DEVICE": device}
    boot, procs = _mesh("bench-kv", pages, [("p-stream", ["--dp-size", "1"], {}),
                                             ("p-nostream", ["--dp-size", "1"],
                                              {"PDMESH_LAYER_STREAMING": "0"})], decode_dp=1,
                        env=env)
    rows = ["| prompt tokens | KV MiB | colocated TTFT ms | PD TTFT ms, no streaming | PD TTFT ms, "
            "streaming | no streaming / colocated | streaming / colocated | streaming saves ms | "
            "transfer tail after compute ms (no streaming / streaming) | prefill rank's compute "
            "ms (no streaming / streaming) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    series: dict = {"tokens": [], "colocated": [], "no streaming": [], "streaming": []}

    async def measure() -> None:
        clients = {name: PdClient(procs[i].address, procs[-1].address, boot.address, name)
                   for i, name in enumerate(("p-stream", "p-nostream"))}
        for n in lengths:
            ids = _prompt(n)
            colocated = percentile([t * 1e3 for t in time_colocated_prefill(engine, ids, repeats)], 50)
            ttft, tail, compute = {}, {}, {}
            for name, client in clients.items():
                await client.pair(ids)  # warm the connections
            results = {name: [] for name in clients}
            for _ in range(repeats):  # interleaved: both see the same machine load
                for name, client in clients.items():
                    results[name].append(await client.pair(ids))
            for name, rs in results.items():
                ttft[name] = percentile([r.ttft_ms for r in rs], 50)
                tail[name] = percentile([r.prefill.transfer_ms for r in rs], 50)
                compute[name] = percentile([r.prefill.compute_ms for r in rs], 50)
            mib = engine.layout.request_bytes(engine.layout.pages_for_tokens(n)) / 2**20
            off, on = ttft["p-nostream"], ttft["p-stream"]
            rows.append(f"| {n} | {mib:.0f} | {colocated:.1f} | {off:.1f} | {on:.1f} | "
                        f"{off / colocated:.2f} | {on / colocated:.2f} | {off - on:.1f} | "
                        f"{tail['p-nostream']:.1f} / {tail['p-stream']:.1f} | "
                        f"{compute['p-nostream']:.1f} / {compute['p-stream']:.1f} |")
            for key, value in (("tokens", n), ("colocated", colocated), ("no streaming", off),
                               ("streaming", on)):
                series[key].append(value)
    try:
        arun(measure())
    finally:
        stop_all([*procs, boot])
    return rows, series


def _plot(series: dict, title: str = "TTFT, bench-kv model, CPU (2 cores)", out: Path = PLOT
          ) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, style in (("colocated", "o-"), ("no streaming", "s--"), ("streaming", "^-")):
        label = "colocated (prefill alone)" if key == "colocated" else f"PD, {key}"
        ax.plot(series["tokens"], series[key], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(series["tokens"], [str(t) for t in series["tokens"]])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT ms (p50)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return str(out.relative_to(out.parent.parent))


def fresh_vs_steady(meshes: int, steady: int, preset: str = "tiny", tokens: int = 64,
                    device: str = "cpu") -> list[str]:
    """First request of a fresh mesh vs the steady state, with the ranks' warm-up and without.
    The tiny model by default: what a fresh mesh pays is set-up, which bench-kv's CPU compute
    (seconds per prompt here) would hide."""
    rows = ["| rank warm-up | fresh meshes | first request TTFT ms (median) | steady TTFT ms (p50) | "
            "first / steady | prefill compute ms, first / steady | prefill's transfer ms after "
            "compute, first / steady |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    layout = build_engine(EngineSpec(preset=preset)).layout
    ids = _prompt(tokens)
    for label, env in (("off (PDMESH_WARMUP=0)", {"PDMESH_WARMUP": "0"}), ("on (default)", {})):
        env = {**env, "PDMESH_DEVICE": device}
        firsts, steadies, first_parts, steady_parts = [], [], [], []
        for _ in range(meshes):
            boot, procs = _mesh(preset, layout.pages_for_tokens(tokens) + 4,
                                [("p-fresh", ["--dp-size", "1"], {})], decode_dp=1, env=env)

            async def measure() -> None:
                client = PdClient(procs[0].address, procs[1].address, boot.address, "p-fresh")
                first = await client.pair(ids)
                firsts.append(first.ttft_ms)
                first_parts.append((first.prefill.compute_ms, first.prefill.transfer_ms))
                for _ in range(steady):
                    result = await client.pair(ids)
                    steadies.append(result.ttft_ms)
                    steady_parts.append((result.prefill.compute_ms, result.prefill.transfer_ms))
            try:
                arun(measure())
            finally:
                stop_all([*procs, boot])
        first, steady_p50 = percentile(firsts, 50), percentile(steadies, 50)
        parts = [f"{percentile([p[i] for p in first_parts], 50):.1f} / "
                 f"{percentile([p[i] for p in steady_parts], 50):.1f}" for i in (0, 1)]
        rows.append(f"| {label} | {meshes} | {first:.1f} | {steady_p50:.1f} | {first / steady_p50:.2f} "
                    f"| {parts[0]} | {parts[1]} |")
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
    table1, series = ttft_vs_length(lengths, 3 if args.quick else 5)
    plot = _plot(series)
    table_fresh = fresh_vs_steady(2 if args.quick else 4, 10 if args.quick else 20)
    table2 = control_path(20 if args.quick else 100)
    return "\n".join([
        "TTFT of a prefill/decode pair (dp 1 each, separate processes) beside one colocated engine "
        "(the same `bench-kv` model: 32 layers, 8 KV heads, head dim 128, bf16) on this 2-core CPU, "
        "p50. PD runs twice against the same decode, requests interleaved: without layer streaming "
        "(`PDMESH_LAYER_STREAMING=0`: compute the prompt, then offer the pages) and with it (the "
        "default: offer first, each chunk of layers leaves as soon as its layers are computed; the "
        "decode cuts a transfer into at least 8 chunks, `--kv-min-chunks`). The last column is the "
        "prefill's own report of the time from the end of its compute to the last byte acknowledged. "
        "8k-token prompts take minutes per prefill on this CPU and are left to the GPU machine.", "",
        *table1, "", f"![TTFT against prompt length]({plot})", "",
        "First request of a fresh mesh (bootstrap, prefill dp 1, decode dp 1, 64-token prompts, "
        "the `tiny` model so that set-up is not hidden behind seconds of CPU compute, layer "
        "streaming on) against the same mesh's steady state, with each rank's warm-up before it "
        "reports ready (`worker/rank/warmup.py`) and without it (`PDMESH_WARMUP=0`).", "",
        *table_fresh, "",
        "Control path per rank path (tiny engine, 16-token prompts, one request at a time): "
        "TTFT minus the prefill's own compute, i.e. rank resolution, the UCX handshake, the "
        "transfer of ~20 KiB and two gRPC hops. `lookups made` counts requests whose decode asked "
        "the bootstrap service.", "", *table2])
