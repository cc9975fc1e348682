"""`make bench` part `http`: the OpenAI-compatible HTTP API's cost beside the router's gRPC API.

One mesh (bootstrap, a follow_bootstrap_room prefill with dp 2, a decode with dp 2, a router with
`--http-port 0`, tiny engine) serves the same streamed requests three ways, in alternating rounds
so that drift on the shared 2 cores hits each path alike:

- gRPC: `RouterService.Generate` with the project's client (the baseline);
- HTTP: `POST /v1/completions` with `stream: true`, served in the router's process on its event
  loop, calling the Generate logic in-process;
- HTTP via a gRPC hop: the same HTTP server run as a sidecar in the benchmark's own process that
  forwards over the router's gRPC API: the design the in-process call avoids.

TTFT is measured at the client, from sending to the first token's message (gRPC) or event (SSE);
throughput is requests/s at concurrency 1 and 16. The aim: at most 1 ms p50 added by HTTP.
"""

from __future__ import annotations

import asyncio
import os
import re
import time

import aiohttp
from tqdm import tqdm

from bench.pd_client import arun, percentile
from pdmesh.proc import Proc, start_all, stop_all
from pdmesh.router.client import RouterClient, build_request
from pdmesh.router.http_server import HttpApi

PROMPT_IDS = [(i * 13 + 5) % 250 + 1 for i in range(32)]
MAX_NEW = 16
LEVELS = (1, 16)
PATHS = ("grpc", "http", "hop")
HTTP_LINE = re.compile(r"HTTP API at (\S+)/v1")
BODY = {"model": "tiny", "prompt": PROMPT_IDS, "max_tokens": MAX_NEW, "temperature": 0, "stream": True,
        "ignore_eos": True}


async def _batch(send, concurrency: int, total: int, bar: tqdm) -> list[tuple[float, float]]:
    """(TTFT ms, total ms) of `total` requests, `concurrency` at a time."""
    samples, left = [], [total]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            start = time.perf_counter()
            ttft = await send()
            samples.append((ttft - start, time.perf_counter() - start))
            bar.update(1)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [(a * 1e3, b * 1e3) for a, b in samples]


class _Hop:
    """A RouterServicer stand-in whose `generate` goes over the router's gRPC API."""

    def __init__(self, client: RouterClient) -> None:
        self.client = client

    async def generate(self, request, timeout_s=None):
        call = self.client.stub.Generate(request, timeout=timeout_s or 120)
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(router: str, router_pid: int, http_url: str, batches: dict, rounds: int,
                   bar: tqdm) -> dict:
    async with RouterClient(router) as client, aiohttp.ClientSession() as session:
        hop = HttpApi(_Hop(client), None, "tiny")
        hop_port = await hop.start("127.0.0.1", 0)
        urls = {"http": f"{http_url}/v1/completions", "hop": f"http://127.0.0.1:{hop_port}/v1/completions"}

        async def grpc_send() -> float:
            first = None
            async for message in client.stub.Generate(build_request(PROMPT_IDS, max_new_tokens=MAX_NEW,
                                                                    ignore_eos=True), timeout=120):
                first = first or time.perf_counter()
            return first

        def http_send(url: str):
            async def send() -> float:
                first = None
                async with session.post(url, json=BODY) as reply:
                    async for line in reply.content:
                        if first is None and line.startswith(b"data: {"):
                            first = time.perf_counter()
                return first
            return send
        senders = {"grpc": grpc_send, "http": http_send(urls["http"]), "hop": http_send(urls["hop"])}
        for send in senders.values():  # connections up, first-request costs paid
            await send()
        results = {c: {p: [] for p in PATHS} for c in LEVELS}
        for c in LEVELS:
            for _ in range(rounds):
                for path in PATHS:
                    began, cpu = time.perf_counter(), cpu_s(router_pid)
                    samples = await _batch(senders[path], c, batches[c], bar)
                    results[c][path].append((samples, time.perf_counter() - began, cpu_s(router_pid) - cpu))
        await hop.stop()
    return results


def _summary(runs: list) -> dict:
    samples = [s for batch, _, _ in runs for s in batch]
    wall = sum(w for _, w, _ in runs)
    ttft = [s[0] for s in samples]
    return {"rps": len(samples) / wall, "ttft50": percentile(ttft, 50), "ttft99": percentile(ttft, 99),
            "cpu_ms": sum(c for _, _, c in runs) / len(samples) * 1e3}


def run(args) -> str:
    # Many short rounds, the paths alternating: a slow spell of the shared machine hits all three.
    rounds, batches = (4, {1: 8, 16: 32}) if args.quick else (12, {1: 16, 16: 48})
    boot = Proc("hb-bootstrap", ["bootstrap", "--port", "0"]).start()
    addr = boot.wait_ready()
    prefill, decode = start_all([
        Proc("hb-prefill", ["prefill", "--instance-id", "hb-prefill", "--dp-size", "2",
                            "--load-balance-method", "follow_bootstrap_room", "--bootstrap-addr", addr]),
        Proc("hb-decode", ["decode", "--instance-id", "hb-decode", "--dp-size", "2"])])
    router = Proc("hb-router", ["router", "--port", "0", "--prefill", prefill.address, "--decode", decode.address,
                                "--max-in-flight", "1024", "--http-port", "0", "--served-model-name", "tiny"]).start()
    router.wait_ready()
    http_url = next(m.group(1) for m in map(HTTP_LINE.search, router.lines) if m)
    try:
        total = sum(batches.values()) * rounds * len(PATHS) + len(PATHS)
        with tqdm(total=total, desc="http bench", unit="req") as bar:
            results = arun(_measure(router.address, router.pid, http_url, batches, rounds, bar))
    finally:
        stop_all([router, prefill, decode, boot])
    rows = ["| concurrency | gRPC req/s | HTTP req/s | ratio | gRPC TTFT p50 / p99 ms | HTTP TTFT p50 / p99 ms "
            "| HTTP added p50 ms | router CPU ms/request gRPC / HTTP | HTTP via a gRPC hop: TTFT p50 ms, added |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in LEVELS:
        g, h, p = (_summary(results[c][path]) for path in PATHS)
        rows.append(f"| {c} | {g['rps']:.1f} | {h['rps']:.1f} | {h['rps'] / g['rps']:.2f} | "
                    f"{g['ttft50']:.2f} / {g['ttft99']:.2f} | {h['ttft50']:.2f} / {h['ttft99']:.2f} | "
                    f"{h['ttft50'] - g['ttft50']:+.2f} | {g['cpu_ms']:.2f} / {h['cpu_ms']:.2f} | "
                    f"{p['ttft50']:.2f}, {p['ttft50'] - g['ttft50']:+.2f} |")
    per_path = ", ".join(f"{batches[c] * rounds} at concurrency {c}" for c in LEVELS)
    return "\n".join([
        f"Tiny engine, {len(PROMPT_IDS)}-token prompts, {MAX_NEW} streamed tokens each; requests per path: "
        f"{per_path}, in {rounds} rounds where the paths alternate; every process on this 2-core machine "
        "(the clients too). HTTP is `POST /v1/completions` with `stream: true` (aiohttp client, SSE). "
        "Router CPU is the router process's user + system time per request (less sensitive to the "
        "machine's other load than wall times). The gRPC hop column runs the same HTTP server as a "
        "sidecar in the benchmark's process, forwarding to the router's gRPC API.", "", *rows])
