"""Why a prefill rank computes slower than the same model in a plain process (an investigation
tool, not in `make bench`).

    python -m bench._gpu_compute_gap [--device cuda] [--reps 15]

The GPU TTFT runs (README, "Time to first token on the GPU") found the prefill rank's compute
1-8 ms slower than `time_colocated_prefill` in the benchmark's process at 512-2048 tokens, the
model being launch-bound there. This times one `bench-kv` prefill per call, in one process, the
variants interleaved call by call so load hits them alike:

- `main`: on the main thread (what the baseline does);
- `thread`: on an engine thread, handed over from an asyncio loop as a rank does
  (worker/rank/pages.py's EngineThread), the loop idle;
- `rank env`: the same with what a rank also runs in its loop: a gRPC aio server and a UCX
  KvSender started, a task waking every 10 ms (the rank's timers);
- `rank env, switch 0.2 ms`: the same under `sys.setswitchinterval(0.0002)`.

Then, with `--mesh`, the same again while a mesh (bootstrap, a prefill and a decode rank,
bench-kv, on the same device) runs beside it: what other processes on one GPU cost a prefill;
and in the same rounds a PD request through that mesh (`rank compute`: the prefill rank's own
report of its compute; `PD TTFT`), so the rank's figure stands beside the in-process ones.
Prints the median ms per variant and prompt length.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._gpu_compute_gap")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--mesh", action="store_true", help="then again beside an idle mesh")
    args = parser.parse_args(argv)
    clean = dict(os.environ)
    table = measure(args, "")
    if args.mesh:
        # this process's UCX set-up put its (CPU) UCX defaults into the environment, which the
        # ranks would inherit: a variable already set wins over a rank's CUDA defaults
        os.environ.clear()
        os.environ.update(clean)
        from bench.ttft import _mesh
        from testkit.proc import stop_all

        env = {"PDMESH_DEVICE": args.device}
        boot, procs = _mesh("bench-kv", 160, [("gap-p", ["--dp-size", "1"], {})], decode_dp=1,
                            env=env)
        try:
            mesh = (procs[0].address, procs[-1].address, boot.address, "gap-p")
            table += measure(args, ", beside a mesh", mesh)
        finally:
            stop_all([*procs, boot])
    print("\n".join(table))
    return 0


def measure(args, label: str, mesh: tuple | None = None) -> list[str]:
    import grpc
    import torch

    from pdmesh.worker.engine import EngineSpec, build_engine
    from pdmesh.worker.engine.reference import empty_kv_pool
    from pdmesh.worker.rank.pages import EngineThread
    from pdmesh.worker.transfer import KvSender

    engine = build_engine(EngineSpec(preset="bench-kv", device=args.device))
    lengths = [int(x) for x in args.lengths.split(",")]
    pages_needed = engine.layout.pages_for_tokens(max(lengths))
    kv = empty_kv_pool(engine, 2 * pages_needed + 8, args.device)
    pages = list(range(1, 2 * pages_needed + 8, 2))[:pages_needed]  # scattered, as a rank's
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    worker = EngineThread()
    default_switch = sys.getswitchinterval()
    results: dict[tuple[str, int], list[float]] = {}

    def direct(ids):
        sync()
        start = time.perf_counter()
        engine.prefill(ids, kv, pages)
        return time.perf_counter() - start

    async def threaded(ids):
        sync()
        start = time.perf_counter()
        await worker.run(engine.prefill, ids, kv, pages)
        return time.perf_counter() - start

    async def run() -> None:
        for n in lengths:  # warm every shape on both threads
            ids = [(i * 7 + 3) % 250 + 1 for i in range(n)]
            direct(ids)
            await threaded(ids)
        server = grpc.aio.server()
        server.add_insecure_port("127.0.0.1:0")
        sender = None
        ticks = None

        async def tick():
            while True:
                await asyncio.sleep(0.01)

        client = None
        if mesh is not None:
            from bench.pd_client import PdClient

            client = PdClient(*mesh)
            for n in lengths:
                await client.pair([(i * 7 + 3) % 250 + 1 for i in range(n)])
        for _ in range(args.reps):
            for n in lengths:
                ids = [(i * 7 + 3) % 250 + 1 for i in range(n)]
                if client is not None:
                    pair = await client.pair(ids)
                    results.setdefault(("rank compute", n), []).append(
                        pair.prefill.compute_ms / 1e3)
                    results.setdefault(("PD TTFT", n), []).append(pair.ttft_ms / 1e3)
                results.setdefault(("main", n), []).append(direct(ids))
                results.setdefault(("thread", n), []).append(await threaded(ids))
                if sender is None:  # the rank's environment, from the first round on
                    await server.start()
                    sender = KvSender("ucx", epoch=1, device=args.device)
                    await sender.start()
                    ticks = asyncio.ensure_future(tick())
                results.setdefault(("rank env", n), []).append(await threaded(ids))
                sys.setswitchinterval(0.0002)
                results.setdefault(("rank env, switch 0.2 ms", n), []).append(await threaded(ids))
                sys.setswitchinterval(default_switch)
        ticks.cancel()
        await sender.close()
        await server.stop(None)

    asyncio.run(run())
    worker.shutdown()
    rows = [] if label else ["| variant | " + " | ".join(f"{n} tokens ms" for n in lengths) + " |",
                             "| --- | " + " | ".join("---:" for _ in lengths) + " |"]
    variants = ["main", "thread", "rank env", "rank env, switch 0.2 ms"]
    for variant in variants + (["rank compute", "PD TTFT"] if mesh else []):
        cells = [f"{statistics.median(results[(variant, n)]) * 1e3:.2f}" for n in lengths]
        rows.append(f"| {variant}{label} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    sys.exit(main())
