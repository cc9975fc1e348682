"""Where a GPU pool-to-pool transfer spends its time (an investigation tool, not in `make bench`).

    python -m bench._gpu_profile [--out DIR]

1. Each step of a chunk on the device, alone (CUDA events, medians of 20): the pack kernel, the
   checksum reduction, the unpack kernel, the same-host copy kernel, and the wall time of the
   sender's `_pack_chunk` (its host wait included) on a 128 MiB chunk of 16-token pages.
2. A loopback pair (bench/gpu_samehost.py) with each process under cProfile: over UCX at 8192
   tokens, and same host at 512 tokens; the event loop threads' top functions are printed.
`--variants`: pool to pool over UCX and same host per PDMESH_UCX_HOT_POLL mode, nothing else.
"""

from __future__ import annotations

import argparse
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path


def _cuda_ms(fn, iters: int = 20) -> float:
    import torch
    times = []
    for _ in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times[3:]), 3)


def _wall_ms(fn, iters: int = 20) -> float:
    times = []
    for _ in range(iters + 3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times[3:]), 3)


def steps() -> dict[str, float]:
    import torch

    from pdmesh.worker.kv import copy_triton, pack_triton
    from pdmesh.worker.transfer import digest
    from pdmesh.worker.transfer.sender import _pack_chunk
    pool_pages, n, layers = 1024, 512, 4
    kv = torch.empty((32, 2, pool_pages, 16, 8, 128), dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(kv)
    ids = torch.randperm(pool_pages, device="cuda")[:n]
    dst_ids = torch.randperm(pool_pages, device="cuda")[:n]
    buf = torch.empty((layers, 2, n, 16, 8, 128), dtype=torch.bfloat16, device="cuda")
    raw = buf.view(-1).view(torch.uint8)
    out = {"chunk MiB": buf.numel() * 2 / (1 << 20)}
    out["pack kernel ms"] = _cuda_ms(lambda: pack_triton.pack_triton(kv, ids, 0, layers, buf))
    out["checksum parts ms"] = _cuda_ms(lambda: digest.parts(raw))
    out["unpack kernel ms"] = _cuda_ms(lambda: pack_triton.unpack_triton(buf, kv, ids, 0, layers))
    out["contiguous copy of the chunk ms"] = _cuda_ms(lambda: buf.clone())
    out["_pack_chunk wall ms"] = _wall_ms(lambda: _pack_chunk(kv, ids, 0, layers, raw))
    out["same-host copy kernel, 32 layers ms"] = _cuda_ms(
        lambda: copy_triton.launch_copy(kv, dst, ids, dst_ids, 0, 32))
    out["same-host copy + sum to host wall ms"] = _wall_ms(
        lambda: int(copy_triton.launch_copy(kv, dst, ids, dst_ids, 0, 32).sum()))
    out["ids to device wall ms"] = _wall_ms(lambda: torch.arange(n).to("cuda"))
    return out


def _top(path: Path, sort: str, limit: int = 35) -> str:
    text = io.StringIO()
    stats = pstats.Stats(str(path), stream=text)
    stats.sort_stats(sort).print_stats(limit)
    return text.getvalue()


def profiled_pairs(out: Path) -> None:
    from bench import gpu_samehost

    for path, tokens, iters in (("ucx", 8192, 6), ("auto", 512, 30)):
        files = {}

        def launcher(role: str, path=path, files=files) -> list[str]:
            files[role] = out / f"{path}-{tokens}-{role}.prof"
            return [sys.executable, "-m", "cProfile", "-o", str(files[role])]

        got = gpu_samehost.pair_goodput(path, [tokens], [16], iters, launcher=launcher)
        print(json.dumps({"path": path, "tokens": tokens,
                          "gbps": {str(k): round(v[0], 1) for k, v in got.items()}}), flush=True)
        for role, prof in files.items():
            for sort in ("tottime", "cumulative"):
                report = _top(prof, sort)
                (out / f"{prof.stem}-{sort}.txt").write_text(report)


def variants() -> None:
    """Pool to pool over UCX and same host, 16-token pages, per PDMESH_UCX_HOT_POLL mode."""
    import os

    from bench import gpu_samehost

    for mode in ("off", "cuda"):
        os.environ["PDMESH_UCX_HOT_POLL"] = mode
        for path in ("ucx", "auto"):
            got = gpu_samehost.pair_goodput(path, [512, 8192], [16], 8)
            print(json.dumps({"hot poll": mode, "path": path,
                              "gbps": {str(k): round(v[0], 1) for k, v in got.items()}}),
                  flush=True)
    os.environ.pop("PDMESH_UCX_HOT_POLL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._gpu_profile")
    parser.add_argument("--out", type=Path, default=Path("/tmp/pdmesh-gpu-profile"))
    parser.add_argument("--variants", action="store_true",
                        help="only pool to pool per hot-poll mode (no steps, no profile)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.variants:
        variants()
        return 0
    print(json.dumps(steps()), flush=True)
    profiled_pairs(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
