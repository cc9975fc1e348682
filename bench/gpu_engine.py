"""Pool to pool through pdmesh's own data plane on the GPU: `KvSender` and `KvReceiver`
(worker/transfer) with CUDA pools, in two processes, over UCX's CUDA transports.

The sender process offers the same pages of its pool as room after room; the receiver fetches
them one after another into its pool and times each `fetch()` (request, status, every chunk
packed, sent, received, checksummed and unpacked, trailer checked). The last fetch of each size
is compared byte for byte with the sender's pages.

    python -m bench.gpu_engine sender --sizes 8192,512 --iters K          # prints READY <address>
    python -m bench.gpu_engine receiver --address A --sizes 8192,512 --iters K [--layers-per-chunk L]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import subprocess
import sys
import time

from bench.gpu_ucx import ROOT, WARMUP, _env

PAGE_SIZE = 16


def run(tokens: list[int], iters: int, layers_per_chunk: int = 0, mode: str = "blocking",
        timeout: float = 300, pages: str = "scattered", extra_env: dict | None = None
        ) -> list[dict]:
    """Both processes; the receiver's figures, one row per request size. `pages`: "scattered"
    (random ids: every byte packed) or "one-run" (fresh pools: every byte in place)."""
    env = dict(_env(), UCXPY_PROGRESS_MODE=mode, **(extra_env or {}))
    base = [sys.executable, "-m", "bench.gpu_engine", "--sizes", ",".join(map(str, tokens)),
            "--iters", str(iters), "--pages", pages]
    sender = subprocess.Popen(base + ["sender"], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in sender.stdout:  # UCX may print warnings on stdout first
            if line.startswith("READY "):
                address = line.split()[1]
                break
            seen.append(line)
        else:
            raise RuntimeError(f"KV sender did not start: {''.join(seen)[-500:]!r}")
        recv = subprocess.run(base + ["receiver", "--address", address, "--layers-per-chunk",
                                      str(layers_per_chunk)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if recv.returncode != 0:
            raise RuntimeError(f"KV receiver failed: {recv.stderr[-2000:]}")
        rows = json.loads(recv.stdout.strip().splitlines()[-1])
        if not all(r["ok"] for r in rows):
            raise RuntimeError(f"KV arrived damaged: {rows}")
        for row in rows:
            row["mode"] = mode
        return rows
    finally:
        if sender.poll() is None:
            sender.stdin.close()
            try:
                sender.wait(timeout=30)
            except subprocess.TimeoutExpired:
                sender.kill()
                sender.wait()


def _token(room: int) -> bytes:
    return hashlib.sha256(b"pdmesh-gpu-bench:%d" % room).digest()[:16]


def _pool(tokens: int, seed: int, pages: str = "scattered"):
    """A CUDA pool twice the request, random bits, and the request's pages (scattered at
    random, or one run: what a fresh pool hands out)."""
    import torch
    from bench.gpu_kernels import DEVICE, MODEL
    from pdmesh.worker.kv.layout import KvLayout
    from pdmesh.worker.kv.pool import KvPool
    layout = KvLayout(MODEL["layers"], PAGE_SIZE, MODEL["heads"], MODEL["head_dim"], MODEL["dtype"])
    n = -(-tokens // PAGE_SIZE)
    pool = KvPool(layout, 2 * n, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    pool.kv.view(torch.int16).random_(-(1 << 15), 1 << 15, generator=gen)
    if pages == "one-run":
        return pool, pool.alloc(n)
    every = pool.alloc(2 * n)
    order = torch.randperm(2 * n, generator=torch.Generator().manual_seed(seed)).tolist()
    ids = [every[j] for j in order[:n]]
    pool.free([every[j] for j in order[n:]])
    return pool, ids


async def _sender(sizes: list[int], iters: int, pages: str) -> None:
    from pdmesh.worker.transfer import KvSender, TransferConfig
    from pdmesh.worker.transfer.config import apply_ucx_defaults
    apply_ucx_defaults(device="cuda")  # as a rank with CUDA pools does (worker/rank/kv_link.py)
    # over UCX (same-host mapping off): the cross-host path, measured on one host
    sender = KvSender("ucx", epoch=1,
                      config=TransferConfig(room_wait_s=60, path="ucx").for_device("cuda"))
    print("READY", await sender.start(), flush=True)
    for si, tokens in enumerate(sizes):
        pool, ids = _pool(tokens, seed=1, pages=pages)
        for i in range(WARMUP + iters):
            room = si * 1000 + i + 1  # rooms are 1 .. 2^63-1
            await sender.offer(room, pool, ids, room, token=_token(room), timeout=120)
        del pool
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # parent: done
    await sender.close()


async def _receiver(address: str, sizes: list[int], iters: int, layers_per_chunk: int,
                    pages: str) -> None:
    import torch
    from pdmesh.worker.transfer import KvReceiver, TransferConfig
    from pdmesh.worker.transfer.config import apply_ucx_defaults
    from pdmesh.worker.transfer.wire import ChunkPlan
    apply_ucx_defaults(device="cuda")
    receiver = KvReceiver("ucx", config=TransferConfig(path="ucx").for_device("cuda"))
    rows = []
    for si, tokens in enumerate(sizes):
        pool, ids = _pool(tokens, seed=2, pages=pages)
        times = []
        for i in range(WARMUP + iters):
            room = si * 1000 + i + 1  # rooms are 1 .. 2^63-1
            start = time.perf_counter()
            first = await receiver.fetch(address, room, epoch=1, pool=pool, page_ids=ids,
                                         token=_token(room), timeout=120,
                                         layers_per_chunk=layers_per_chunk or None)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
            assert first == room, (first, room)
        src, src_ids = _pool(tokens, seed=1, pages=pages)
        ok = torch.equal(pool.kv[:, :, ids].view(torch.int16),
                         src.kv[:, :, src_ids].view(torch.int16))
        nbytes = pool.layout.request_bytes(len(ids))
        per_chunk = layers_per_chunk or ChunkPlan.layers_for(pool.layout, len(ids),
                                                             receiver.config.chunk_bytes)
        median = statistics.median(times)
        rows.append({"role": "engine", "pages": pages, "tokens": tokens, "bytes": nbytes, "ok": ok,
                     "layers_per_chunk": per_chunk, "s_per_iter": median,
                     "s_mean": statistics.fmean(times), "gbps": nbytes / median / 1e9})
        del pool, src
    print(json.dumps(rows), flush=True)
    await receiver.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_engine",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["sender", "receiver"])
    parser.add_argument("--sizes", required=True, help="tokens per request, comma-separated")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--address", help="the sender's address (receiver)")
    parser.add_argument("--layers-per-chunk", type=int, default=0, help="0: the receiver's default")
    parser.add_argument("--pages", choices=["scattered", "one-run"], default="scattered")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.role == "sender":
        asyncio.run(_sender(sizes, args.iters, args.pages))
    else:
        asyncio.run(_receiver(args.address, sizes, args.iters, args.layers_per_chunk, args.pages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
