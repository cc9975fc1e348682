"""Baseline for bench/transfer.py: bare ucxx send/recv of one contiguous, reused buffer.

    python -m bench._transfer_bare recv --sizes 1048576,16777216 --iters 10   # prints PORT
    python -m bench._transfer_bare send --port P --sizes ... --iters 10

Same process settings as a pdmesh rank (pdmesh's UCX defaults, blocking progress, and the same
hot polling while data moves when PDMESH_UCX_HOT_POLL is on), one message in flight (or
`--depth`), tagged messages (`--mode tag`) or active messages (`--mode am`, ucxx allocates
each receive) through ucxx's async API, or tagged messages through pdmesh's UCX link and its
progress engine (`--mode engine`: the wire as pdmesh drives it, without pack/unpack, buffers on
`--device`; with
`--split K` each size goes as K messages of size/K, at most `--window-bytes` on the wire, as
pdmesh's wire plan sends 16-token pages: one message per layer and K/V). The receiver prints
one JSON line per size: {"size": N, "gbps": G}, counting from the first completed message to
the last (for --split, from the start of the second round of K), so connection set-up is not in
the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from pdmesh.worker.transfer.config import apply_ucx_defaults


def _progress_task():
    """pdmesh's hot polling (ucx.UcxTransport) while a size is measured, if enabled."""
    import ucxx

    if os.environ.get("PDMESH_UCX_HOT_POLL", "0") != "1":
        return None
    worker = ucxx.core._get_ctx().worker

    async def poll():
        while True:
            worker.progress()
            await asyncio.sleep(0)

    return asyncio.ensure_future(poll())


async def _recv(args) -> None:
    import numpy as np
    import ucxx

    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    listener = ucxx.create_listener(lambda ep: ready.set_result(ep))
    print(json.dumps({"port": listener.port}), flush=True)
    ep = await ready
    for size in args.sizes:
        bufs = [np.ones(size, np.uint8) for _ in range(args.depth)]
        poller = _progress_task()
        if args.mode == "am":
            await ep.am_recv()
            started = time.perf_counter()
            for _ in range(args.iters):
                await ep.am_recv()
        else:
            started, posted, pending = None, 0, []

            def post(i):
                return asyncio.ensure_future(ep.recv(bufs[i % args.depth], tag=i))

            while posted < min(args.depth, args.iters + 1):
                pending.append(post(posted))
                posted += 1
            while pending:
                await pending.pop(0)
                started = started or time.perf_counter()
                if posted < args.iters + 1:
                    pending.append(post(posted))
                    posted += 1
        elapsed = time.perf_counter() - started
        if poller:
            poller.cancel()
        print(json.dumps({"size": size, "gbps": size * args.iters / elapsed / 1e9}), flush=True)
        await ep.send(np.zeros(1, np.uint8), tag=1 << 40)  # next size
    await ep.close()


async def _send(args) -> None:
    import numpy as np
    import ucxx

    ep = await ucxx.create_endpoint("127.0.0.1", args.port)
    for size in args.sizes:
        buf = np.ones(size, np.uint8)
        poller = _progress_task()
        pending = []
        for i in range(args.iters + 1):
            if len(pending) >= args.depth:
                await pending.pop(0)
            if args.mode == "am":
                pending.append(asyncio.ensure_future(ep.am_send(buf)))
            else:
                pending.append(asyncio.ensure_future(ep.send(buf, tag=i)))
        for p in pending:
            await p
        if poller:
            poller.cancel()
        await ep.recv(np.zeros(1, np.uint8), tag=1 << 40)
    await ep.close()


async def _engine_split_recv(link, size: int, args) -> float:
    """Rounds of `args.split` messages into one reused pool-like buffer; seconds per round."""
    import torch

    buf = torch.ones(size, dtype=torch.uint8)
    step = size // args.split
    parts = [buf[i * step:(i + 1) * step] for i in range(args.split)]
    started = None
    for round_ in range(args.iters + 1):
        futures = [link.recv_data(part, (round_ << 16) | i) for i, part in enumerate(parts)]
        for future in futures:
            await future
        started = started or time.perf_counter()
    return (time.perf_counter() - started) / args.iters


async def _engine_split_send(link, size: int, args) -> None:
    import torch

    buf = torch.ones(size, dtype=torch.uint8)
    step = size // args.split
    parts = [buf[i * step:(i + 1) * step] for i in range(args.split)]
    window = max(1, args.window_bytes // max(1, step))
    for round_ in range(args.iters + 1):
        pending = []
        for i, part in enumerate(parts):
            if len(pending) >= window:
                await pending.pop(0)
            pending.append(link.send_data(part, (round_ << 16) | i))
        for future in pending:
            await future


async def _engine_recv(args) -> None:
    """The same measurement through pdmesh's UCX link (its progress engine), no pack/unpack."""
    import torch

    from pdmesh.worker.transfer.ucx import UcxTransport

    transport = UcxTransport()
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    address = await transport.listen(lambda link: ready.set_result(link), "127.0.0.1", 0)
    print(json.dumps({"port": int(address.rpartition(":")[2])}), flush=True)
    link = await ready
    for size in args.sizes:
        if args.split > 1:
            seconds = await _engine_split_recv(link, size, args)
            print(json.dumps({"size": size, "gbps": size / seconds / 1e9}), flush=True)
            await link.send_data(torch.zeros(1, dtype=torch.uint8), 1 << 40)
            continue
        bufs = [torch.ones(size, dtype=torch.uint8, device=args.device) for _ in range(args.depth)]
        started, posted, pending = None, 0, []
        while posted < min(args.depth, args.iters + 1):
            pending.append(link.recv_data(bufs[posted % args.depth], posted))
            posted += 1
        while pending:
            await pending.pop(0)
            started = started or time.perf_counter()
            if posted < args.iters + 1:
                pending.append(link.recv_data(bufs[posted % args.depth], posted))
                posted += 1
        elapsed = time.perf_counter() - started
        print(json.dumps({"size": size, "gbps": size * args.iters / elapsed / 1e9}), flush=True)
        await link.send_data(torch.zeros(1, dtype=torch.uint8), 1 << 40)
    await transport.close()


async def _engine_send(args) -> None:
    import torch

    from pdmesh.worker.transfer.ucx import UcxTransport

    transport = UcxTransport()
    link = await transport.connect(f"ucx://127.0.0.1:{args.port}", 10)
    for size in args.sizes:
        if args.split > 1:
            await _engine_split_send(link, size, args)
            await link.recv_data(torch.zeros(1, dtype=torch.uint8), 1 << 40)
            continue
        buf = torch.ones(size, dtype=torch.uint8, device=args.device)
        pending = []
        for i in range(args.iters + 1):
            if len(pending) >= args.depth:
                await pending.pop(0)
            pending.append(link.send_data(buf, i))
        for p in pending:
            await p
        await link.recv_data(torch.zeros(1, dtype=torch.uint8), 1 << 40)
    await transport.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("recv", "send"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], required=True)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--mode", choices=("tag", "am", "engine"), default="tag")
    parser.add_argument("--split", type=int, default=1,
                        help="engine mode: send each size as this many messages")
    parser.add_argument("--window-bytes", type=int, default=16 << 20,
                        help="engine mode with --split: bytes on the wire at most")
    parser.add_argument("--device", default="cpu",
                        help="engine mode: where the buffers live (cuda: UCX's CUDA transports)")
    args = parser.parse_args()
    apply_ucx_defaults(device=args.device)
    if args.mode == "engine":
        asyncio.run(_engine_recv(args) if args.role == "recv" else _engine_send(args))
    else:
        asyncio.run(_recv(args) if args.role == "recv" else _send(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
