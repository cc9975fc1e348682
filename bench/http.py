"""`make bench` part `http`: the OpenAI-compatible HTTP API's cost beside the router's gRPC API.

One mesh (bootstrap, a follow_bootstrap_room prefill with dp 2, a decode with dp 2, a router with
`--http-port 0`, tiny engine) serves the same streamed requests three ways:

- gRPC: `RouterService.Generate` with the project's client (the baseline);
- HTTP: `POST /v1/completions` with `stream: true`, served in the router's process on its event
  loop, calling the Generate logic in-process;
- HTTP via a gRPC hop: the same HTTP server run as a sidecar in the benchmark's own process that
  forwards over the router's gRPC API: the design the in-process call avoids.

TTFT is measured at the client, from sending to the first token's message (gRPC) or event (SSE),
with the three paths mixed under one load (each concurrent worker takes them in turn), so a slow
spell of the shared 2 cores hits all alike; throughput (requests/s) and the router's CPU time per
request come from short rounds of one path at a time, the paths alternating. Concurrency 1 and
16. The aim: at most 1 ms p50 added by HTTP.
"""

from __future__ import annotations

import asyncio
import os
import re
import time

import aiohttp
from tqdm import tqdm

from bench.pd_client import arun, percentile
from testkit.proc import Proc, start_all, stop_all
from pdmesh.router.client import RouterClient, build_request
from pdmesh.router.http_server import HttpApi
from pdmesh.router.instances import InstanceTable

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


async def _mixed(senders: dict, concurrency: int, per_path: int, bar: tqdm) -> dict[str, list[float]]:
    """TTFT ms per path with `concurrency` requests in flight, the paths taking turns in every
    worker: all three see the same load at the same moments (a fair TTFT comparison)."""
    ttft: dict[str, list[float]] = {p: [] for p in PATHS}

    async def worker(offset: int) -> None:
        for k in range(per_path * len(PATHS) // concurrency):
            path = PATHS[(offset + k) % len(PATHS)]
            start = time.perf_counter()
            ttft[path].append((await senders[path]() - start) * 1e3)
            bar.update(1)
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return ttft


async def _measure(router: str, router_pid: int, http_url: str, plan: dict, bar: tqdm) -> dict:
    async with RouterClient(router) as client, aiohttp.ClientSession() as session:
        hop = HttpApi(_Hop(client), InstanceTable(), "tiny")  # its /health is not used
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
        results = {c: {"rounds": {p: [] for p in PATHS}} for c in LEVELS}
        for c in LEVELS:
            results[c]["ttft"] = await _mixed(senders, c, plan["mixed"][c], bar)
            for _ in range(plan["rounds"]):  # throughput: one path at a time, the paths alternating
                for path in PATHS:
                    began, cpu = time.perf_counter(), cpu_s(router_pid)
                    await _batch(senders[path], c, plan["batch"][c], bar)
                    results[c]["rounds"][path].append((plan["batch"][c], time.perf_counter() - began,
                                                       cpu_s(router_pid) - cpu))
        await hop.stop()
    return results


def _summary(result: dict, path: str) -> dict:
    runs, ttft = result["rounds"][path], result["ttft"][path]
    count = sum(n for n, _, _ in runs)
    return {"rps": count / sum(w for _, w, _ in runs), "cpu_ms": sum(c for _, _, c in runs) / count * 1e3,
            "ttft50": percentile(ttft, 50), "ttft99": percentile(ttft, 99)}


def run(args) -> str:
    # TTFT: the paths mixed under one load; throughput: short alternating rounds, one path at a time.
    plan = ({"mixed": {1: 12, 16: 48}, "rounds": 3, "batch": {1: 8, 16: 32}} if args.quick else
            {"mixed": {1: 64, 16: 192}, "rounds": 6, "batch": {1: 16, 16: 48}})
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
        total = len(PATHS) * (1 + sum(plan["mixed"].values()) + plan["rounds"] * sum(plan["batch"].values()))
        with tqdm(total=total, desc="http bench", unit="req") as bar:
            results = arun(_measure(router.address, router.pid, http_url, plan, bar))
        load = os.getloadavg()[0]
    finally:
        stop_all([router, prefill, decode, boot])
    rows = ["| concurrency | gRPC TTFT p50 / p99 ms | HTTP TTFT p50 / p99 ms | HTTP added p50 ms "
            "| gRPC req/s | HTTP req/s | ratio | router CPU ms/request gRPC / HTTP "
            "| HTTP via a gRPC hop: TTFT p50 ms (added), req/s |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in LEVELS:
        g, h, p = (_summary(results[c], path) for path in PATHS)
        rows.append(f"| {c} | {g['ttft50']:.2f} / {g['ttft99']:.2f} | {h['ttft50']:.2f} / {h['ttft99']:.2f} | "
                    f"{h['ttft50'] - g['ttft50']:+.2f} | {g['rps']:.1f} | {h['rps']:.1f} | "
                    f"{h['rps'] / g['rps']:.2f} | {g['cpu_ms']:.2f} / {h['cpu_ms']:.2f} | "
                    f"{p['ttft50']:.2f} ({p['ttft50'] - g['ttft50']:+.2f}), {p['rps']:.1f} |")
    mixed = ", ".join(f"{plan['mixed'][c]} at concurrency {c}" for c in LEVELS)
    rounds = ", ".join(f"{plan['batch'][c] * plan['rounds']} at concurrency {c}" for c in LEVELS)
    return "\n".join([
        f"Tiny engine, {len(PROMPT_IDS)}-token prompts, {MAX_NEW} streamed tokens each; every process "
        f"on this 2-core machine, the clients too (load average {load:.1f} at the end: other work "
        "shared the cores). TTFT is measured at the client with the three paths mixed under the same "
        f"load (each of the concurrent workers takes the paths in turn; per path {mixed}); "
        f"throughput and router CPU (the router process's user + system time per request) in "
        f"{plan['rounds']} rounds where the paths alternate, one at a time (per path {rounds}). HTTP "
        "is `POST /v1/completions` with `stream: true` (aiohttp client, SSE); the gRPC hop runs the "
        "same HTTP server as a sidecar in the benchmark's process, forwarding to the router's gRPC "
        "API.", "", *rows])
