"""Why a prefill on a worker thread is slower than on the main thread (an investigation tool,
not in `make bench`; bench/_gpu_compute_gap.py found the gap).

    python -m bench._gpu_thread_gap [--device cuda] [--reps 10]

One `bench-kv` prefill per call, variants interleaved: on the main thread; on a worker thread
with the main thread blocked on the result (no event loop); the same from an asyncio loop (what a
rank does); a worker thread that set its CUDA device first; a worker thread with the default
stream made current explicitly; a worker thread that set torch's intra-op threads again
(`runtime.apply_torch_threads`). Prints the median ms per variant and prompt length.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._gpu_thread_gap")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--configured", action="store_true",
                        help="configure torch's threads first, as a rank does "
                             "(PDMESH_TORCH_THREADS)")
    args = parser.parse_args(argv)
    import torch

    from pdmesh.worker.engine.runtime import apply_torch_threads, configure_torch_threads
    if args.configured:
        configure_torch_threads()

    from pdmesh.worker.engine import EngineSpec, build_engine
    from pdmesh.worker.engine.reference import empty_kv_pool

    engine = build_engine(EngineSpec(preset="bench-kv", device=args.device))
    lengths = [int(x) for x in args.lengths.split(",")]
    need = engine.layout.pages_for_tokens(max(lengths))
    kv = empty_kv_pool(engine, need + 8, args.device)
    pages = list(range(need))
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    plain = ThreadPoolExecutor(1)
    index = torch.device(args.device).index or 0
    devset = ThreadPoolExecutor(1, initializer=(lambda: torch.cuda.set_device(index)) if cuda
                                else None)

    reapplied = ThreadPoolExecutor(1, initializer=apply_torch_threads)
    print(f"torch threads: main {torch.get_num_threads()}, worker "
          f"{plain.submit(torch.get_num_threads).result()}", flush=True)

    def prefill(ids):
        return engine.prefill(ids, kv, pages)

    def on_stream(ids):
        with torch.cuda.stream(torch.cuda.default_stream()):
            return engine.prefill(ids, kv, pages)

    def timed(run, ids):
        sync()
        start = time.perf_counter()
        run(ids)
        return time.perf_counter() - start

    loop = asyncio.new_event_loop()
    variants = {
        "main thread": lambda ids: prefill(ids),
        "worker, main blocked on result": lambda ids: plain.submit(prefill, ids).result(),
        "worker, from an asyncio loop": lambda ids: loop.run_until_complete(
            loop.run_in_executor(plain, prefill, ids)),
        "worker that set its CUDA device": lambda ids: devset.submit(prefill, ids).result(),
        "worker, default stream made current": lambda ids: plain.submit(
            on_stream if cuda else prefill, ids).result(),
        "worker that applied torch's threads (apply_torch_threads)": lambda ids: reapplied.submit(
            prefill, ids).result(),
        "main thread again": lambda ids: prefill(ids),
    }
    results: dict = {}
    for n in lengths:  # warm every variant and shape
        ids = [(i * 7 + 3) % 250 + 1 for i in range(n)]
        for run in variants.values():
            timed(run, ids)
    for _ in range(args.reps):
        for n in lengths:
            ids = [(i * 7 + 3) % 250 + 1 for i in range(n)]
            for name, run in variants.items():
                results.setdefault((name, n), []).append(timed(run, ids))
    print("| variant | " + " | ".join(f"{n} tokens ms" for n in lengths) + " |")
    print("| --- | " + " | ".join("---:" for _ in lengths) + " |")
    for name in variants:
        print(f"| {name} | " + " | ".join(
            f"{statistics.median(results[(name, n)]) * 1e3:.2f}" for n in lengths) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
