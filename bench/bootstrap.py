"""Benchmark of the bootstrap service: lookup latency, throughput, batches, a registry of 1M rooms.

The service runs in subprocesses (`python -m bench.bootstrap serve ...`), the client here, as
in production: a decode's rank process asks a bootstrap service over loopback. Each figure is
measured beside its baseline on the same server and transport, in alternating rounds so that
noise from a shared machine hits both alike:

- unary LookupRoom beside grpc.health.v1.Health/Check (an empty unary RPC);
- the lookup stream (`BootstrapClient.wait_for_room`, `lookup_rooms`) beside `ping`, an empty
  message on the same stream;
- the same lookup against a registry holding 1,000,000 live rooms beside one holding only the
  rooms looked up (the issue asks for < 10 % slow-down);
- registrations: the registration stream beside SGLang's bootstrap server measured in the same
  run (and the unary RegisterRoom), 1 and 64 in flight, register-then-lookup
  (`bench._bootstrap_register`).

SGLang's HTTP bootstrap server, measured on this 2-core machine with a keep-alive aiohttp client,
answered in 0.16-0.19 ms p50 (1 in flight), 13,000-16,000 lookups/s (64 in flight), ~770,000
rooms/s in 64-room batches; those figures are quoted, not re-measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time

SEED = 20261125
LOOKUP_ROOMS = 20_000
BATCH_CONCURRENCY = (1, 8, 64)
MEASURED_STREAM_P50_MS = 0.19  # shared/MEASURED.md: an empty grpc.aio bidi-stream round trip here
INSTANCE = "bench-prefill"
# Both sides on the loop `pdmesh bootstrap` uses by default (uvloop when installed).
EVENT_LOOP = os.environ.get("PDMESH_EVENT_LOOP", "auto")
SGLANG = {"p50_ms": (0.16, 0.19), "c64_per_s": (13_000, 16_000), "batch_rooms_per_s": 770_000}


def bench_rooms(n: int = LOOKUP_ROOMS) -> list[int]:
    rng = random.Random(SEED)
    return [rng.randrange(1, 1 << 63) for _ in range(n)]


# ---- the server side (a subprocess) -----------------------------------------------------------

async def _serve(preload: int, capacity: int = 0) -> None:
    from pdmesh.bootstrap.v1 import bootstrap_pb2
    from pdmesh.server.config import BootstrapConfig
    from pdmesh.server.demo import instance_info
    from pdmesh.server.service import create_bootstrap_server

    config = BootstrapConfig(port=0, max_rooms=preload + LOOKUP_ROOMS + 1024 + capacity, room_ttl_s=3600)
    _, port, service = create_bootstrap_server("127.0.0.1:0", config)
    info = instance_info(INSTANCE, dp_size=8)
    registry = service.registry
    registry.register_instance(info)
    for i, room in enumerate(bench_rooms()):
        registry.register_room(INSTANCE, room, i % 8)
    rng = random.Random(SEED + 1)
    for i in range(preload):
        room = rng.randrange(1, 1 << 63)
        if registry.lookup(room) is None:
            registry.register_room(INSTANCE, room, i % 8)
    await service.start()
    print(port, registry.stats()["rooms"], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    await service.stop(0)
    assert isinstance(bootstrap_pb2.RoomError(), object)


def start_server(preload: int = 0, capacity: int = 0) -> tuple[subprocess.Popen, str, int]:
    """A bench service holding the lookup rooms and `preload` more, with room for `capacity` more."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.bootstrap", "serve", str(preload), str(capacity)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PDMESH_LOG_LEVEL": "WARNING"})
    line = proc.stdout.readline().split()
    if len(line) != 2:
        proc.kill()
        raise RuntimeError("bench bootstrap server did not start")
    return proc, f"127.0.0.1:{line[0]}", int(line[1])


def stop_server(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


# ---- the client side ----------------------------------------------------------------------------

async def latency(op, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        await op(i)
        out.append(time.perf_counter() - t)
    return out


async def throughput(op, n: int, concurrency: int) -> float:
    per = n // concurrency

    async def worker(w: int) -> None:
        for i in range(per):
            await op(w * per + i)
    t = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return per * concurrency / (time.perf_counter() - t)


async def alternate(ops: dict, measure, rounds: int) -> dict[str, list]:
    """Run `measure(op)` for each op in turn, `rounds` times; collect the results per op."""
    results = {name: [] for name in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            results[name].append(await measure(op))
    return results


def pct(samples: list[float], q: float) -> float:
    return sorted(samples)[min(len(samples) - 1, int(q * len(samples)))] * 1e3


async def measure_all(quick: bool) -> dict:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from pdmesh.bootstrap.v1 import bootstrap_pb2
    from pdmesh.server.client import BootstrapClient

    rooms = bench_rooms()
    n_lat, n_tp, rounds = (300, 2_000, 2) if quick else (4_000, 28_000, 7)
    small, small_addr, _ = start_server(0)
    big, big_addr, big_rooms = start_server(100_000 if quick else 1_000_000)
    out: dict = {"big_rooms": big_rooms}
    try:
        async with BootstrapClient(small_addr) as c, BootstrapClient(big_addr) as cb:
            health = health_pb2_grpc.HealthStub(c._channel)
            check = health_pb2.HealthCheckRequest()
            stub = c._stub
            for _ in range(200):  # warm both streams and channels
                await c.wait_for_room(rooms[0], 5)
                await cb.wait_for_room(rooms[0], 5)
                await c.ping()
                await health.Check(check, timeout=5)
                await stub.LookupRoom(bootstrap_pb2.LookupRoomRequest(bootstrap_room=rooms[0]), timeout=5)
            raw = stub.WatchRooms()  # the transport alone: write one empty message, read its answer
            empty = bootstrap_pb2.WatchRoomsRequest(tag=1)

            async def raw_round_trip(_i: int) -> None:
                await raw.write(empty)
                await raw.read()
            ops = {
                "raw_stream": raw_round_trip,
                "unary_empty": lambda i: health.Check(check, timeout=5),
                "unary_lookup": lambda i: stub.LookupRoom(
                    bootstrap_pb2.LookupRoomRequest(bootstrap_room=rooms[i % len(rooms)]), timeout=5),
                "stream_empty": lambda i: c.ping(5),
                "stream_lookup": lambda i: c.wait_for_room(rooms[i % len(rooms)], 5),
                "stream_lookup_1m": lambda i: cb.wait_for_room(rooms[i % len(rooms)], 5),
            }
            lat = await alternate(ops, lambda op: latency(op, n_lat // rounds), rounds)
            out["lat"] = {k: [x for xs in v for x in xs] for k, v in lat.items()}
            raw.cancel()
            del ops["raw_stream"]
            tp = await alternate(ops, lambda op: throughput(op, n_tp // rounds, 64), rounds)
            out["c64"] = {k: statistics.median(v) for k, v in tp.items()}
            batches = [rooms[i:i + 64] for i in range(0, len(rooms) - 63, 64)]
            bops = {
                "stream_empty": lambda i: c.ping(5),
                "batch64": lambda i: c.lookup_rooms(batches[i % len(batches)], 5),
                "batch64_1m": lambda i: cb.lookup_rooms(batches[i % len(batches)], 5),
            }
            for conc in BATCH_CONCURRENCY:
                r = await alternate(bops, lambda op: throughput(op, n_tp // rounds // 4, conc), rounds)
                out[f"batch_c{conc}"] = {k: statistics.median(v) for k, v in r.items()}
    finally:
        stop_server(small)
        stop_server(big)
    out["registry_us"] = registry_cost(rooms, big_rooms - len(rooms))
    return out


def registry_cost(rooms: list[int], extra: int) -> dict[str, float]:
    """In-process cost of `Registry.lookup_many` over 64 registered rooms (best of many tries, us),
    in a registry holding only `rooms` and in one holding `extra` more: what a big table costs."""
    from pdmesh.server.demo import instance_info
    from pdmesh.server.registry import Registry

    def build(n_extra: int) -> Registry:
        registry = Registry(max_rooms=len(rooms) + n_extra + 1024, room_ttl_s=3600)
        registry.register_instance(instance_info(INSTANCE, epoch=1, dp_size=8))
        for i, room in enumerate(rooms):
            registry.register_room(INSTANCE, room, i % 8)
        rng = random.Random(SEED + 1)
        for i in range(n_extra):
            room = rng.randrange(1, 1 << 63)
            if registry.lookup(room) is None:
                registry.register_room(INSTANCE, room, i % 8)
        return registry

    tables = {"small": build(0), "big": build(extra)}
    batches = [rooms[i:i + 64] for i in range(0, len(rooms) - 63, 64)]
    best = {name: float("inf") for name in tables}
    for _ in range(20):
        for name, registry in tables.items():
            t = time.perf_counter()
            for batch in batches:
                registry.lookup_many(batch)
            best[name] = min(best[name], (time.perf_counter() - t) / len(batches) * 1e6)
    return best


def render(m: dict) -> str:
    lat, c64 = m["lat"], m["c64"]
    p50 = {k: pct(v, 0.5) for k, v in lat.items()}
    p99 = {k: pct(v, 0.99) for k, v in lat.items()}
    rows = [
        "| figure | lookup | empty-RPC baseline | lookup / baseline | SGLang HTTP (quoted) |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| unary LookupRoom p50 / p99, 1 in flight (ms) | {p50['unary_lookup']:.3f} / {p99['unary_lookup']:.3f} "
        f"| {p50['unary_empty']:.3f} / {p99['unary_empty']:.3f} | {p50['unary_lookup'] / p50['unary_empty']:.2f}x | 0.16-0.19 |",
        f"| stream lookup p50 / p99, 1 in flight (ms) | {p50['stream_lookup']:.3f} / {p99['stream_lookup']:.3f} "
        f"| {p50['stream_empty']:.3f} / {p99['stream_empty']:.3f} | {p50['stream_lookup'] / p50['stream_empty']:.2f}x | 0.16-0.19 |",
        f"| unary LookupRoom, 64 in flight (lookups/s) | {c64['unary_lookup']:,.0f} | {c64['unary_empty']:,.0f} "
        f"| {c64['unary_lookup'] / c64['unary_empty']:.2f}x | 13,000-16,000 |",
        f"| stream lookup, 64 in flight (lookups/s) | {c64['stream_lookup']:,.0f} | {c64['stream_empty']:,.0f} "
        f"| {c64['stream_lookup'] / c64['stream_empty']:.2f}x | 13,000-16,000 |",
        f"| raw stream round trip p50 / p99, no client library (ms) | | {p50['raw_stream']:.3f} / "
        f"{p99['raw_stream']:.3f} | | |",
    ]
    for conc in BATCH_CONCURRENCY:
        b = m[f"batch_c{conc}"]
        rows.append(f"| 64-room batches, {conc} in flight (rooms/s) | {b['batch64'] * 64:,.0f} "
                    f"| {b['stream_empty']:,.0f} empty msgs/s | {b['batch64'] / b['stream_empty']:.2f}x msgs/s "
                    f"| ~770,000 |")
    big = m["batch_c64"]
    slow = {"stream lookup p50": p50["stream_lookup_1m"] / p50["stream_lookup"] - 1,
            "stream lookups/s, 64 in flight": c64["stream_lookup"] / c64["stream_lookup_1m"] - 1,
            "rooms/s in 64-room batches, 64 in flight": big["batch64"] / big["batch64_1m"] - 1}
    reg = m["registry_us"]
    slow["registry lookup_many of 64 rooms, in process"] = reg["big"] / reg["small"] - 1
    speed = p50["raw_stream"] / MEASURED_STREAM_P50_MS
    return (
        "\n".join(rows) + "\n\n"
        f"A registry of {m['big_rooms']:,} live rooms beside one of {LOOKUP_ROOMS:,} (slow-down; "
        "negative means faster, i.e. noise): "
        + ", ".join(f"{k} {v:+.1%}" for k, v in slow.items())
        + f" ({reg['small']:.1f} us and {reg['big']:.1f} us a batch).\n\n"
        f"A raw stream round trip took {p50['raw_stream']:.3f} ms in this run against "
        f"{MEASURED_STREAM_P50_MS} ms in shared/MEASURED.md, where SGLang's figures were taken: this "
        f"run's machine was {speed:.1f}x slower; scaled to that machine, the stream lookup p50 is "
        f"{p50['stream_lookup'] / speed:.3f} ms.\n\n"
        "Client and service are separate processes on the same 2 cores, both on uvloop (the "
        "service's default); the stream rows use `BootstrapClient` (one shared stream per "
        "address; requests made together go out in one message). Rounds alternate between a "
        "figure and its baseline so that a shared machine's noise hits both.\n")


def run(args) -> str:
    from bench import _bootstrap_register as register
    from pdmesh.grpcutil import run_async
    lookups = render(run_async(measure_all(args.quick), EVENT_LOOP))
    registrations = register.render(run_async(register.measure(args.quick), EVENT_LOOP))
    return lookups + "\n" + registrations


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "serve":
        from pdmesh.grpcutil import run_async
        run_async(_serve(*(int(a) for a in sys.argv[2:4])), EVENT_LOOP)
    else:
        parser = argparse.ArgumentParser()
        parser.add_argument("--quick", action="store_true")
        print(run(parser.parse_args()))
