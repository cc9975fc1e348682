"""Step timeline of one transfer through a loopback pair (an investigation tool, not in `make bench`).

    python -m bench._trace [--device cuda] [--path ucx|auto] [--tokens 512] [--page 16]
                           [--iters 30] [--out DIR] [--scattered] [--set FIELD=INT ...]

Runs `pdmesh.worker.transfer.loopback` sender and receiver (bench/transfer.py's Proc) with the
transfer's steps wrapped to log when each is entered and left (`time.perf_counter_ns`, CLOCK_
MONOTONIC: one clock for both processes), fetches one room at a time, and prints each step's
median offset from the fetch's start (after 5 warm-up fetches), in time order. Worker-thread
steps (`_pack_chunk`, `_finish_chunk`, `copy_job`) are logged from their threads (a small chunk
sent in place is finished, or summed once posted, on the event loop: streams.INLINE_SUM_MAX_BYTES).
"""

from __future__ import annotations

import argparse
import collections
import functools
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

STEPS = [  # (module, owner or None, function, label)
    ("pdmesh.worker.transfer.receiver", "KvReceiver", "fetch", "R fetch"),
    ("pdmesh.worker.transfer.receiver", "KvReceiver", "_on_control", "R control"),
    ("pdmesh.worker.transfer.streams", "Incoming", "_post_chunk", "R post chunk"),
    ("pdmesh.worker.transfer.streams", None, "_finish_chunk", "R finish chunk"),
    ("pdmesh.worker.transfer.sender", "KvSender", "_on_control", "S control"),
    ("pdmesh.worker.transfer.sender", "KvSender", "_claim", "S claim"),
    ("pdmesh.worker.transfer.sender", None, "_pack_chunk", "S pack chunk (thread)"),
    ("pdmesh.worker.transfer.streams", "MessageSums", "_take", "sum a message in place"),
    ("pdmesh.worker.transfer.streams", "Outgoing", "send_chunk", "S send chunk"),
    ("pdmesh.worker.transfer.streams", "Outgoing", "settle", "S settle"),
    ("pdmesh.worker.transfer.streams", "Outgoing", "checksum", "S checksum"),
    ("pdmesh.worker.transfer.samehost", None, "write", "S same-host write"),
    ("pdmesh.worker.transfer.samehost_copy", "CudaCopier", "chunk", "S cuda chunk"),
    ("pdmesh.worker.transfer.samehost_copy", "CudaCopier", "settle", "S cuda settle"),
    ("pdmesh.worker.transfer.samehost_copy", None, "copy_job", "S copy job"),
    ("pdmesh.worker.transfer.wire", None, "send_trailer", "S trailer"),
    ("pdmesh.worker.transfer.ucx", "UcxLink", "post_control", "post control"),
    ("pdmesh.worker.transfer.ucx", "UcxLink", "send_data", "S post data"),
    ("pdmesh.worker.transfer.ucx", "UcxLink", "recv_data", "R post data"),
    ("pdmesh.worker.transfer.streams", None, "_wait_device", "R unpack wait (thread)"),
]


def _install(log) -> None:
    import importlib

    def mark(label: str) -> None:
        log.write(f"{time.perf_counter_ns()} {label}\n")

    for module_name, owner_name, name, label in STEPS:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        real = getattr(owner, name)
        if inspect.iscoroutinefunction(real):
            async def wrapped(*a, _real=real, _label=label, **k):
                mark(_label + " >")
                try:
                    return await _real(*a, **k)
                finally:
                    mark(_label + " <")
        else:
            def wrapped(*a, _real=real, _label=label, **k):
                mark(_label + " >")
                try:
                    return _real(*a, **k)
                finally:
                    mark(_label + " <")
        setattr(owner, name, functools.wraps(real)(wrapped))


def child(argv: list[str], out: Path) -> int:
    log = open(out / f"trace-{os.getpid()}.log", "w", buffering=1)  # noqa: SIM115 - process-long
    _install(log)
    from pdmesh.worker.transfer import loopback
    return loopback.main(argv)


def timeline(out: Path, warm: int = 5) -> list[str]:
    events = sorted((int(t), name) for f in out.glob("trace-*.log")
                    for t, name in (line.split(" ", 1) for line in f.read_text().splitlines()))
    fetches, current = [], None
    for t, name in events:
        if name == "R fetch >":
            current = [(t, name)]
            fetches.append(current)
        elif current is not None:
            current.append((t, name))
    offsets: dict[str, list[float]] = collections.defaultdict(list)
    for steps in fetches[warm:]:
        start, seen = steps[0][0], collections.Counter()
        for t, name in steps:
            seen[name] += 1
            offsets[f"{name} #{seen[name]}"].append((t - start) / 1e3)
    rows = [(statistics.median(v), k) for k, v in offsets.items() if len(v) * 2 > len(fetches) - warm]
    return [f"{us:10.1f} us  {key}" for us, key in sorted(rows)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        return child(argv[2:], Path(argv[1]))
    parser = argparse.ArgumentParser(prog="python -m bench._trace")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--path", default="auto", choices=("auto", "ucx"))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--page", type=int, default=16)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("/tmp/pdmesh-trace"))
    parser.add_argument("--scattered", action="store_true", help="pages at random ids")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                        help="a TransferConfig field of both sides (loopback's --set)")
    args = parser.parse_args(argv)
    from bench.transfer import Proc
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("trace-*.log"):
        old.unlink()
    env = dict(os.environ, PDMESH_KV_TRANSFER_PATH=args.path, PDMESH_TORCH_THREADS="1")
    pages = max(1, args.tokens // args.page)
    layout = f"32,{args.page},8,128,bf16"
    common = ["--device", args.device, "--layout", layout, "--pages", str(2 * pages + 8),
              "--room-wait", "60", *[x for f in args.set for x in ("--set", f)]]
    base = [sys.executable, "-m", "bench._trace", "child", str(args.out)]
    sender = Proc(base + ["sender", *common], env)
    receiver = Proc(base + ["receiver", *common], env)
    seconds = []
    try:
        address = sender.get("event", "ready", timeout=180)["address"]
        receiver.get("event", "ready", timeout=180)
        for room in range(1, args.iters + 1):
            sender.send(op="offer", room=room, pages=pages, timeout=60, scattered=args.scattered)
            sender.get("room", room)
            receiver.send(op="fetch", address=address, rooms=[room], pages=pages, timeout=60,
                          scattered=args.scattered)
            done = receiver.get("event", "fetch_done")
            receiver.get("event", "batch_done")
            sender.get("event", "offer_done")
            if not done["ok"]:
                raise RuntimeError(f"transfer failed: {done}")
            seconds.append(done["seconds"])
    finally:
        sender.stop()
        receiver.stop()
    print(f"{args.path} path, {args.device}, {args.tokens} tokens, {args.page}-token pages "
          f"({done['path']}): median fetch {statistics.median(seconds[5:]) * 1e3:.2f} ms")
    print("\n".join(timeline(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
