"""`make bench` part `router`: requests/s and TTFT/TPOT through the router beside the same load
sent straight to the workers (the router's own cost as a ratio), at concurrency 1, 16 and 64.

Mesh: bootstrap, a follow_bootstrap_room prefill (dp 2), a decode (dp 2) and a router, separate
processes, tiny engine (the point is the serving path, not the model). The direct client does
what the router does (draw a room and a token, call prefill and decode at once, stream), without
the router's hop. A progress bar shows the run; a PNG plot goes to docs/router-bench.png.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tqdm import tqdm

from bench.pd_client import PdClient, arun, percentile
from testkit.proc import Proc, start_all, stop_all
from pdmesh.router.client import RouterClient

ROOT = Path(__file__).resolve().parent.parent
PROMPT_IDS = [(i * 13 + 5) % 250 + 1 for i in range(32)]
MAX_NEW = 16


async def _load(send, concurrency: int, total: int, bar: tqdm) -> dict:
    samples: list[tuple[float, float, int]] = []
    queue = list(range(total))

    async def worker() -> None:
        while queue:
            queue.pop()
            start = time.perf_counter()
            ttft, tokens = await send()
            samples.append((ttft, (time.perf_counter() - start) * 1e3, tokens))
            bar.update(1)
    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - began
    ttft = [s[0] for s in samples]
    tpot = [(s[1] - s[0]) / max(s[2] - 1, 1) for s in samples]
    return {"rps": total / wall, "ttft50": percentile(ttft, 50), "ttft99": percentile(ttft, 99),
            "tpot50": percentile(tpot, 50), "tpot99": percentile(tpot, 99)}


async def _via_router(address: str, levels: list[int], per_level: int, bar: tqdm) -> dict:
    async with RouterClient(address) as client:
        async def send():
            start, ttft, tokens = time.perf_counter(), None, 0
            async for message in client.stream(PROMPT_IDS, max_new_tokens=MAX_NEW, ignore_eos=True):
                if message.token_ids and ttft is None:
                    ttft = (time.perf_counter() - start) * 1e3
                tokens += len(message.token_ids)
            return ttft, tokens
        await send()
        return {c: await _load(send, c, max(per_level, c), bar) for c in levels}


async def _direct(make_client, levels: list[int], per_level: int, bar: tqdm) -> dict:
    client = make_client()  # channels belong to this event loop

    async def send():
        result = await client.pair(PROMPT_IDS, MAX_NEW)
        return result.ttft_ms, result.tokens
    await send()
    return {c: await _load(send, c, max(per_level, c), bar) for c in levels}


def _plot(levels: list[int], routed: dict, direct: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, data in (("through the router", routed), ("straight to the workers", direct)):
        ax1.plot(levels, [data[c]["rps"] for c in levels], marker="o", label=name)
        ax2.plot(levels, [data[c]["ttft50"] for c in levels], marker="o", label=name)
    ax1.set(xlabel="concurrency", ylabel="requests/s", xscale="log", title="Throughput")
    ax2.set(xlabel="concurrency", ylabel="TTFT p50 (ms)", xscale="log", title="Time to first token")
    ax1.legend()
    fig.tight_layout()
    out = ROOT / "docs" / "router-bench.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=100)
    return str(out.relative_to(ROOT))


def run(args) -> str:
    levels = [1, 16, 64]
    per_level = 32 if args.quick else 192
    boot = Proc("rb-bootstrap", ["bootstrap", "--port", "0"]).start()
    addr = boot.wait_ready()
    prefill, decode = start_all([
        Proc("rb-prefill", ["prefill", "--instance-id", "rb-prefill", "--dp-size", "2",
                            "--load-balance-method", "follow_bootstrap_room", "--bootstrap-addr", addr]),
        Proc("rb-decode", ["decode", "--instance-id", "rb-decode", "--dp-size", "2"])])
    router = Proc("rb-router", ["router", "--port", "0", "--prefill", prefill.address,
                                "--decode", decode.address, "--max-in-flight", "1024"]).start()
    router.wait_ready()
    try:
        total = sum(max(per_level, c) + 1 for c in levels) * 2
        with tqdm(total=total, desc="router bench", unit="req") as bar:
            routed = arun(_via_router(router.address, levels, per_level, bar))
            direct = arun(_direct(lambda: PdClient(prefill.address, decode.address, addr, "rb-prefill"),
                                  levels, per_level, bar))
    finally:
        stop_all([router, prefill, decode, boot])
    plot = _plot(levels, routed, direct)
    rows = ["| concurrency | router req/s | direct req/s | ratio | router TTFT p50 / p99 ms | direct TTFT p50 / p99 ms | added p50 ms | router TPOT p50 ms | direct TPOT p50 ms |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in levels:
        r, d = routed[c], direct[c]
        rows.append(f"| {c} | {r['rps']:.1f} | {d['rps']:.1f} | {r['rps'] / d['rps']:.2f} | "
                    f"{r['ttft50']:.2f} / {r['ttft99']:.2f} | {d['ttft50']:.2f} / {d['ttft99']:.2f} | "
                    f"{r['ttft50'] - d['ttft50']:.2f} | {r['tpot50']:.2f} | {d['tpot50']:.2f} |")
    return "\n".join([
        f"Tiny engine, {len(PROMPT_IDS)}-token prompts, {MAX_NEW} tokens each, all processes on this "
        "2-core machine (the router shares the cores with the workers it measures).", "",
        *rows, "", f"![router benchmark]({plot})"])
