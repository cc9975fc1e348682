"""The floor under a registration at 1 in flight: an empty-message round trip of a bare gRPC
stream, in the transports and settings one could pick for it (`python -m bench._grpc_floor`).

No pdmesh code on either side: a minimal echo servicer of RegisterRoomsStream in its own process,
the client here. Variants, measured in alternating rounds (p50 ms, CPU us per round trip on each
side from /proc):

- aio server + aio client over TCP (what pdmesh runs), the same over a Unix domain socket;
- a sync grpc server (thread pool) with the aio client; a sync client (request iterator fed from
  a queue, blocking `next()` on the answers) with the aio server;
- channel and server options `grpc.optimization_target=latency`, `grpc.http2.bdp_probe=0`.

Measured here: every variant lands within noise of the first, about the round trip of SGLang's
keep-alive HTTP bootstrap (README, "Bootstrap service").
"""

from __future__ import annotations

import asyncio
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time

OPTIONS = {"default": [], "latency": [("grpc.optimization_target", "latency")],
           "no_bdp_probe": [("grpc.http2.bdp_probe", 0)]}


def _serve(kind: str, address: str, options: str) -> None:
    import grpc

    from pdmesh.bootstrap.v1 import bootstrap_pb2, bootstrap_pb2_grpc

    class Sync(bootstrap_pb2_grpc.BootstrapServiceServicer):
        def RegisterRoomsStream(self, requests, context):
            for request in requests:
                yield bootstrap_pb2.RegisterRoomsStreamResponse(tag=request.tag)

    class Aio(bootstrap_pb2_grpc.BootstrapServiceServicer):
        async def RegisterRoomsStream(self, requests, context):
            while (request := await context.read()) is not grpc.aio.EOF:
                await context.write(bootstrap_pb2.RegisterRoomsStreamResponse(tag=request.tag))

    if kind == "sync":
        from concurrent import futures
        server = grpc.server(futures.ThreadPoolExecutor(4), options=OPTIONS[options])
        bootstrap_pb2_grpc.add_BootstrapServiceServicer_to_server(Sync(), server)
        print(server.add_insecure_port(address), flush=True)
        server.start()
        sys.stdin.read()
        return

    async def main() -> None:
        server = grpc.aio.server(options=OPTIONS[options])
        bootstrap_pb2_grpc.add_BootstrapServiceServicer_to_server(Aio(), server)
        print(server.add_insecure_port(address), flush=True)
        await server.start()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    from pdmesh.grpcutil import run_async
    run_async(main())


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _aio_round_trips(target: str, options: str, n: int) -> list[float]:
    import grpc

    from pdmesh.bootstrap.v1 import bootstrap_pb2, bootstrap_pb2_grpc
    from pdmesh.grpcutil import run_async

    async def main() -> list[float]:
        async with grpc.aio.insecure_channel(target, options=OPTIONS[options]) as channel:
            call = bootstrap_pb2_grpc.BootstrapServiceStub(channel).RegisterRoomsStream()
            message, out = bootstrap_pb2.RegisterRoomsStreamRequest(tag=1), []
            for i in range(n + 200):  # 200 to warm up
                t = time.perf_counter()
                await call.write(message)
                await call.read()
                out.append(time.perf_counter() - t)
            call.cancel()
            return out[200:]
    return run_async(main())


def _sync_round_trips(target: str, n: int) -> list[float]:
    import grpc

    from pdmesh.bootstrap.v1 import bootstrap_pb2, bootstrap_pb2_grpc
    requests: queue.SimpleQueue = queue.SimpleQueue()
    with grpc.insecure_channel(target) as channel:
        answers = bootstrap_pb2_grpc.BootstrapServiceStub(channel).RegisterRoomsStream(
            iter(requests.get, None))
        message, out = bootstrap_pb2.RegisterRoomsStreamRequest(tag=1), []
        for _ in range(n + 200):
            t = time.perf_counter()
            requests.put(message)
            next(answers)
            out.append(time.perf_counter() - t)
        requests.put(None)
        return out[200:]


VARIANTS = {  # name: (server kind, server options, client, over a Unix socket)
    "aio/aio tcp": ("aio", "default", "aio", False),
    "aio/aio unix socket": ("aio", "default", "aio", True),
    "sync server / aio client": ("sync", "default", "aio", False),
    "aio server / sync client": ("aio", "default", "sync", False),
    "aio/aio, optimization_target=latency": ("aio", "latency", "aio", False),
    "aio/aio, bdp_probe=0": ("aio", "no_bdp_probe", "aio", False),
}


def measure_variant(name: str, n: int, tmp: str) -> tuple[float, float, float]:
    kind, options, client, unix = VARIANTS[name]
    address = f"unix:{tmp}/floor.sock" if unix else "127.0.0.1:0"
    if unix and os.path.exists(f"{tmp}/floor.sock"):
        os.unlink(f"{tmp}/floor.sock")
    proc = subprocess.Popen([sys.executable, "-m", "bench._grpc_floor", "serve", kind, address, options],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = proc.stdout.readline().strip()
        target = address if unix else f"127.0.0.1:{port}"
        mine, theirs = time.process_time(), _cpu_s(proc.pid)
        samples = (_aio_round_trips(target, options, n) if client == "aio"
                   else _sync_round_trips(target, n))
        mine, theirs = time.process_time() - mine, _cpu_s(proc.pid) - theirs
    finally:
        proc.stdin.close()
        proc.wait(10)
    count = n + 200
    return statistics.median(samples) * 1e3, mine / count * 1e6, theirs / count * 1e6


def run(n: int = 1500, rounds: int = 3) -> str:
    results: dict[str, list] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for name in VARIANTS:
                results[name].append(measure_variant(name, n, tmp))
    base = statistics.median(r[0] for r in results["aio/aio tcp"])
    rows = ["| variant | p50 ms (median of rounds) | / aio over tcp | client CPU us | server CPU us |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        p50 = statistics.median(x[0] for x in r)
        rows.append(f"| {name} | {p50:.3f} | {p50 / base:.2f}x | {statistics.median(x[1] for x in r):.0f} "
                    f"| {statistics.median(x[2] for x in r):.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "serve":
        _serve(*sys.argv[2:5])
    else:
        print(run(*(int(a) for a in sys.argv[1:3])))
