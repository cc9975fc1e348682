"""A sender or receiver rank in its own process, driven by JSON lines: the data plane alone.

    python -m pdmesh.worker.transfer.loopback sender   [--pages N] [--layout 32,16,8,128,bf16]
    python -m pdmesh.worker.transfer.loopback receiver [--pages N] [--layout ...]

Tests and `bench/transfer.py` start two of these (UCX settings come from the environment, as in
a rank) and write commands, one JSON object per line, on stdin; events come back as JSON lines
on stdout (UCX may print its own lines there too: skip lines that do not start with "{").

    sender:   {"op": "offer", "room": R, "pages": N, "timeout": T, "fill": true}
              -> {"event": "offered", "room": R}, later {"event": "offer_done", "room": R, "ok": ..,
                  "cpu_s": process CPU seconds (all threads) from offered to sent}
    receiver: {"op": "fetch", "address": A, "rooms": [R, ..], "pages": N, "timeout": T,
               "verify": true, "sequential": false, "layers_per_chunk": k (optional),
               "fresh_links": false (each room on a brand-new link, closed after it)}
              -> {"event": "fetch_done", "room": R, "ok": .., "seconds": .., "bytes": .., "cpu_s": ..,
                  "path": "samehost" or "ucx"}
                 per room,
                 then {"event": "batch_done", "seconds": ..}
    both:     {"op": "pool"} -> {"event": "pool", "free": F, "total": P};  {"op": "exit"}

Any command may name another "layout" (same syntax as --layout); its pool is made on first use
with "pool_pages" pages.

Pages come from the pool as it hands them out (contiguous runs where free pages allow), or with
"scattered": true (offer and fetch) at random ids among all free pages, or with "max_run": K in
runs of random lengths 1..K in random order: pools fragmented by other requests. With "fill", the sender writes room R's pages from a generator seeded by R and the receiver
("verify") compares every byte it received with the same bytes. The token of room R is derived
from R on both sides (the real control path sends a random one).
`--pack-delay S` slows each chunk's pack (or same-host copy) by S seconds and reports
{"event": "packing"} (used to kill a sender mid-transfer).

`--kv-transfer-path auto|ucx` (default: PDMESH_KV_TRANSFER_PATH, else auto) picks the path as a
rank does: with auto, the receiver's pools live in shared memory and a sender of the same host
writes straight into them (worker/transfer/samehost.py); ucx moves every byte over UCX.
`--set FIELD=INT` sets an integer TransferConfig field (e.g. direct_min_bytes).
`--no-direct-checksum` (an experiment, on both sides) makes the checksum of messages sent in
place zero, to measure what summing them costs (bench/_transfer_report.py's explore rows).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import faulthandler
import hashlib
import json
import os
import random
import signal
import sys
import threading
import time

import torch

from pdmesh.errors import PdmeshError
from pdmesh.worker.kv.layout import DTYPE_NAMES, KvLayout
from pdmesh.worker.kv.pack import pack, unpack
from pdmesh.worker.kv.pool import KvPool
from pdmesh.worker.transfer import samehost, samehost_copy
from pdmesh.worker.transfer import sender as sender_module
from pdmesh.worker.transfer.config import TransferConfig, apply_ucx_defaults
from pdmesh.worker.transfer.link import make_transport
from pdmesh.worker.transfer.receiver import KvReceiver
from pdmesh.worker.transfer.sender import KvSender

EPOCH = 1
_print_lock = threading.Lock()


def emit(**event) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def token_for(room: int) -> bytes:
    return hashlib.sha256(b"pdmesh-loopback:%d" % room).digest()[:16]


def content(layout: KvLayout, room: int, pages: int) -> torch.Tensor:
    """Room `room`'s staging bytes, the same in both processes."""
    gen = torch.Generator().manual_seed(room)
    data = torch.randint(0, 256, (layout.request_bytes(pages),), dtype=torch.uint8, generator=gen)
    return data.view(layout.dtype)


def parse_layout(text: str) -> KvLayout:
    layers, size, heads, dim, dtype = text.split(",")
    return KvLayout(int(layers), int(size), int(heads), int(dim), DTYPE_NAMES[dtype])


def make_pool(layout: KvLayout, pages: int, shared: bool = False, device: str = "cpu") -> KvPool:
    pool = KvPool(layout, pages, device=device, shared=shared)
    pool.kv.view(torch.uint8).random_()  # touch every page now, not inside a timed transfer
    return pool


def alloc(pool: KvPool, n: int, cmd: dict, seed: int) -> list[int]:
    """n pages: as the pool hands them out (runs), at random ids among all free pages
    ("scattered"), or in runs of random lengths 1..max_run in random order ("max_run")."""
    max_run = 1 if cmd.get("scattered") else int(cmd.get("max_run", 0))
    if max_run < 1:
        return pool.alloc(n)
    free = sorted(pool.alloc(pool.num_free) if n <= pool.num_free else pool.alloc(n))
    rng, runs, at = random.Random(seed), [], 0
    while at < len(free):
        length = rng.randint(1, max_run)
        runs.append(free[at:at + length])
        at += length
    rng.shuffle(runs)
    ids = [page for run in runs for page in run]
    pool.free(ids[n:])
    return ids[:n]


def error_fields(err: BaseException | None) -> dict:
    if err is None:
        return {"ok": True}
    if isinstance(err, PdmeshError):
        return {"ok": False, "code": err.code.name, "reason": err.reason, "message": err.message}
    return {"ok": False, "code": "UNKNOWN", "reason": type(err).__name__, "message": str(err)}


class Rank:
    def __init__(self, args, config: TransferConfig) -> None:
        self.args = args
        # a receiver offers its pools to same-host senders unless the path is forced to UCX
        self.shared = args.role == "receiver" and args.kv_transfer_path == "auto"
        self.pools: dict[str, KvPool] = {args.layout: make_pool(
            parse_layout(args.layout), args.pages, self.shared, args.device)}
        config = config.for_device(args.device)
        self.transport = make_transport(args.transport)
        self.sender = KvSender(self.transport, epoch=EPOCH, config=config, device=args.device) \
            if args.role == "sender" else None
        self.receiver = KvReceiver(self.transport, config=config) \
            if args.role == "receiver" else None
        self.tasks: set[asyncio.Task] = set()

    def pool_for(self, cmd: dict) -> KvPool:
        """The pool of the command's layout (created on first use with `pool_pages` pages)."""
        key = cmd.get("layout", self.args.layout)
        if key not in self.pools:
            self.pools[key] = make_pool(parse_layout(key), cmd.get("pool_pages", self.args.pages),
                                        self.shared, self.args.device)
        return self.pools[key]

    async def offer(self, cmd: dict) -> None:
        room, pages, pool = cmd["room"], cmd["pages"], self.pool_for(cmd)
        try:
            ids = alloc(pool, pages, cmd, ~room)
        except PdmeshError as err:
            emit(event="offer_done", room=room, **error_fields(err))
            return
        if cmd.get("fill"):
            unpack(content(pool.layout, room, pages).to(pool.kv.device), pool.kv, ids)
        try:
            offer = self.sender.offer(room, pool, ids, room % 50000, token=token_for(room),
                                      timeout=cmd.get("timeout", 30.0))
            emit(event="offered", room=room)
            cpu = time.process_time()
            await offer
            emit(event="offer_done", room=room, ok=True, cpu_s=time.process_time() - cpu)
        except PdmeshError as err:
            emit(event="offer_done", room=room, **error_fields(err))
        finally:
            pool.free(ids)

    async def fetch_one(self, cmd: dict, room: int) -> None:
        pages, pool = cmd["pages"], self.pool_for(cmd)
        try:
            ids = alloc(pool, pages, cmd, room)
        except PdmeshError as err:
            emit(event="fetch_done", room=room, **error_fields(err))
            return
        started, error, verified = time.perf_counter(), None, None
        cpu = time.process_time()
        receiver = KvReceiver(self.transport, config=self.receiver.config) \
            if cmd.get("fresh_links") else self.receiver
        try:
            first = await receiver.fetch(
                cmd["address"], room, epoch=EPOCH, pool=pool, page_ids=ids,
                token=token_for(room), timeout=cmd.get("timeout", 30.0),
                layers_per_chunk=cmd.get("layers_per_chunk"))
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu
            if first != room % 50000:
                error = PdmeshError(f"first token {first} != {room % 50000}")
            if cmd.get("verify"):
                got = pack(pool.kv, ids).reshape(-1).cpu()
                verified = torch.equal(got.view(torch.uint8),
                                       content(pool.layout, room, pages).view(torch.uint8))
        except PdmeshError as err:
            seconds, error, cpu = time.perf_counter() - started, err, 0.0
        finally:
            pool.free(ids)
            link = receiver._links.get(cmd["address"])
            path = "samehost" if link and receiver._samehost.mapped(link, pool) else "ucx"
            if receiver is not self.receiver:
                await receiver.close()  # closes its link: the sender's endpoint goes too
        emit(event="fetch_done", room=room, seconds=seconds, verified=verified, cpu_s=cpu,
             bytes=pool.layout.request_bytes(pages), path=path, **error_fields(error))

    async def fetch(self, cmd: dict) -> None:
        started = time.perf_counter()
        if cmd.get("sequential"):
            for room in cmd["rooms"]:
                await self.fetch_one(cmd, room)
        else:
            await asyncio.gather(*(self.fetch_one(cmd, room) for room in cmd["rooms"]))
        emit(event="batch_done", seconds=time.perf_counter() - started)

    def spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self) -> None:
        if self.sender is not None:
            emit(event="ready", address=await self.sender.start(), pid=os.getpid())
        else:
            emit(event="ready", pid=os.getpid())
        lines: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        threading.Thread(target=_read_stdin, args=(loop, lines), daemon=True).start()
        while True:
            line = await lines.get()
            cmd = json.loads(line) if line else {"op": "exit"}
            op = cmd.get("op")
            if op == "offer":
                self.spawn(self.offer(cmd))
            elif op == "fetch":
                self.spawn(self.fetch(cmd))
            elif op == "pool":
                pool = self.pool_for(cmd)
                emit(event="pool", free=pool.num_free, total=pool.num_pages)
            elif op == "exit":
                break
        for side in (self.sender, self.receiver):
            if side is not None:
                await side.close()
        await self.transport.close()
        emit(event="bye")


def _read_stdin(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue) -> None:
    for line in sys.stdin:
        if line.strip():
            loop.call_soon_threadsafe(lines.put_nowait, line)
    loop.call_soon_threadsafe(lines.put_nowait, "")


def transfer_config(args) -> TransferConfig:
    """The rank's TransferConfig from its flags: `--depth` sets both windows, then every `--set
    FIELD=INT` (which wins over `--depth`); ValueError names a bad item or value."""
    fields = {f.name for f in dataclasses.fields(TransferConfig)}
    settings = {"room_wait_s": args.room_wait, "abort_grace_s": args.grace,
                "send_depth": args.depth, "recv_window": args.depth,
                "path": args.kv_transfer_path}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set {item!r}: want FIELD=INT, FIELD one of TransferConfig's "
                             f"fields ({', '.join(sorted(fields))})")
        try:
            settings[name] = int(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: {value!r} is not an integer") from None
    return TransferConfig(**settings)  # its own checks raise ValueError too


def _slow(real, delay: float, layers_at: int):
    """`real` (a chunk's pack, or same-host copy, whose layers a, b are its arguments
    `layers_at` and `layers_at + 1`), announced and slowed by `delay` seconds."""

    def slowed(*args):
        emit(event="packing", layers=[int(args[layers_at]), int(args[layers_at + 1])])
        time.sleep(delay)
        return real(*args)

    return slowed


def _skip_direct_checksum() -> None:
    """`--no-direct-checksum`: the parts of messages in place (summed as they complete, or per
    chunk) are zeros on this side; the packed messages keep the sums their pack takes."""
    from pdmesh.worker.transfer import digest

    def rows_zero(rows: torch.Tensor) -> torch.Tensor:
        return torch.zeros(tuple(rows.shape[:-1]) + (2,), dtype=torch.int64, device=rows.device)

    def message_zero(data, out, row) -> None:
        out[row] = 0

    digest.rows_parts, digest.message_parts = rows_zero, message_zero


def main(argv: list[str] | None = None) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test dumps a stuck rank's stacks
    parser = argparse.ArgumentParser(prog="python -m pdmesh.worker.transfer.loopback",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("sender", "receiver"))
    parser.add_argument("--pages", type=int, default=256, help="pages in this rank's pool")
    parser.add_argument("--layout", default="32,16,8,128,bf16",
                        help="layers,page_size,kv_heads,head_dim,dtype")
    parser.add_argument("--transport", default="ucx", choices=("ucx", "inproc"))
    parser.add_argument("--room-wait", type=float, default=5.0)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--depth", type=int, default=TransferConfig.send_depth,
                        help="chunks in flight per transfer, each way")
    parser.add_argument("--pack-delay", type=float, default=0.0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                        help="an integer TransferConfig field, e.g. --set direct_min_bytes=65536")
    parser.add_argument("--device", default="cpu", help="torch device of the pools (e.g. cuda:0)")
    parser.add_argument("--kv-transfer-path", choices=samehost.PATHS,
                        default=os.environ.get(samehost.PATH_ENV, "auto"),
                        help=f"auto: same-host writes where possible; ucx: always UCX "
                             f"[{samehost.PATH_ENV}]")
    parser.add_argument("--loop", default="asyncio", choices=("asyncio", "uvloop"))
    parser.add_argument("--no-direct-checksum", action="store_true",
                        help="experiment (both sides): messages sent in place sum to zero, so "
                             "the trailer checks nothing of them; measures what summing costs")
    args = parser.parse_args(argv)
    if args.kv_transfer_path not in samehost.PATHS:  # a bad PDMESH_KV_TRANSFER_PATH
        parser.error(f"{samehost.PATH_ENV}={args.kv_transfer_path!r} is not one of "
                     f"{', '.join(samehost.PATHS)}")
    try:
        config = transfer_config(args)
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(int(os.environ.get("PDMESH_TORCH_THREADS", "1")))
    apply_ucx_defaults(device=args.device)  # as a rank does: CUDA pools get UCX's CUDA settings
    if args.pack_delay:
        sender_module._pack_chunk = _slow(sender_module._pack_chunk, args.pack_delay, 2)
        samehost_copy.copy_job = _slow(samehost_copy.copy_job, args.pack_delay, 3)
        samehost.CPU_CHUNK_BYTES = 1  # chunk as the receiver asks, so there is a "mid-copy"
        samehost_copy.INLINE_COPY_BYTES = 0  # a slowed copy must not stall the event loop
    if args.no_direct_checksum:
        _skip_direct_checksum()
    rank = Rank(args, config)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(rank.serve())
    else:
        asyncio.run(rank.serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
