"""KV transfer goodput, pool to pool across two processes, beside bare ucxx and ucx_perftest.

For each transport (tcp; shared memory), in one script and one environment:
- pdmesh: a sender and a receiver rank (`python -m pdmesh.worker.transfer.loopback`); one
  request's pages of a 32-layer pool (8 KV heads, head dim 128, bf16) with 16-token and with
  1-token pages, fetched one request at a time: request, status, the wire plan's messages,
  trailer checked; pages as a fresh pool hands them out (one run: in place) and at scattered ids
  (packed). Goodput = request bytes / fetch time (median).
- the fragmentation a burst leaves in rank pools (bench/_fragmentation.py).
- bare ucxx: one contiguous buffer of the same size, reused, sent back to back
  (`bench/_transfer_bare.py`, the same process settings) with ucxx's async API: what the wire
  gives Python; and the same through pdmesh's own UCX link (its progress engine, no pack,
  unpack or protocol), which separates the engine from what the data plane adds.
- `ucx_perftest -t tag_bw -e` (UCX's own C tool from the libucx wheel, error handling on as ucxx
  endpoints have it), same UCX environment.
GB/s are 1e9 bytes per second. The ratio pdmesh / bare ucxx is what pdmesh itself costs.
"""

from __future__ import annotations

import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pdmesh.worker.transfer.config import UCX_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
TRANSPORTS = {"tcp": {"UCX_TLS": "tcp", "PDMESH_KV_TRANSFER_PATH": "ucx"},
              "shared memory": {"UCX_TLS": "sm,self,tcp", "PDMESH_KV_TRANSFER_PATH": "ucx"}}
# the same-host path (bench/_transfer_samehost.py): control over UCX, KV written into the pool
SAME_HOST = {"same host": {"UCX_TLS": "sm,self,tcp", "PDMESH_KV_TRANSFER_PATH": "auto"}}
LAYOUTS = {16: "32,16,8,128,bf16", 1: "32,1,8,128,bf16", 64: "32,64,8,128,bf16"}
UCX_PAGE_TOKENS = (16, 1)
PAGE_BYTES = {16: 2 * MiB, 1: 128 * 1024, 64: 8 * MiB}  # one page over 32 layers, K and V
# The engine baseline cut like pdmesh's wire plan of 16-token pages: one message per layer and K/V
SPLIT = 64
# Peers measured on this machine (issue 3), one request's pages pool to pool, GB/s.
NIXL = {("tcp", 16): 2.62, ("shared memory", 16): 6.5, ("tcp", 1): 0.37, ("shared memory", 1): 1.1}


def _env(transport: str, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    chosen = {**TRANSPORTS, **SAME_HOST}[transport]
    for key, value in {**UCX_DEFAULTS, **chosen, **(extra or {})}.items():
        env.setdefault(key, value) if key in os.environ else env.__setitem__(key, value)
    env.setdefault("PDMESH_TORCH_THREADS", "1")
    return env


class Proc:
    """A child process speaking JSON lines (non-JSON lines are ignored)."""

    def __init__(self, argv: list[str], env: dict) -> None:
        self.stderr = tempfile.TemporaryFile("w+")
        self.popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))
        self.lines.put(None)

    def send(self, **cmd) -> None:
        self.popen.stdin.write(json.dumps(cmd) + "\n")
        self.popen.stdin.flush()

    def get(self, key: str, value=None, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            item = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if item is None:
                self.stderr.seek(0)
                raise RuntimeError(f"{self.popen.args[:4]} exited: {self.stderr.read()[-2000:]}")
            if key in item and (value is None or item[key] == value):
                return item

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.stdin.close()
                self.popen.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.popen.kill()


def _pages(page_tokens: int, size: int) -> int:
    return max(1, size // PAGE_BYTES[page_tokens])


def pdmesh_goodput(env: dict, sizes: list[int], iters: dict[int, int], flags: list[str] = (),
                   layers_per_chunk: int | None = None, page_tokens: tuple = (16, 1),
                   scattered: bool = False, cpu: dict | None = None
                   ) -> dict[tuple[int, int], float]:
    """{(page_tokens, size): GB/s} from one loopback sender/receiver pair; `cpu`, if given,
    gets {(page_tokens, size): (sender, receiver)} median process CPU ms per transfer."""
    pool_pages = {t: int(_pages(t, max(sizes)) * 1.25) + 8 for t in LAYOUTS}
    base = [sys.executable, "-m", "pdmesh.worker.transfer.loopback"]
    args = ["--layout", LAYOUTS[16], "--pages", str(pool_pages[16]), *flags]
    sender, receiver = Proc(base + ["sender"] + args, env), Proc(base + ["receiver"] + args, env)
    results, room = {}, 1
    try:
        address = sender.get("event", "ready")["address"]
        receiver.get("event", "ready")
        for tokens in page_tokens:
            layout = LAYOUTS[tokens]
            for size in sizes:
                pages, seconds, cpus = _pages(tokens, size), [], []
                common = {"layout": layout, "pool_pages": pool_pages[tokens], "pages": pages,
                          "scattered": scattered}
                for i in range(iters[size] + 1):
                    sender.send(op="offer", room=room, timeout=120, **common)
                    sender.get("event", "offered")
                    receiver.send(op="fetch", address=address, rooms=[room], timeout=120,
                                  layers_per_chunk=layers_per_chunk, **common)
                    done = receiver.get("event", "fetch_done")
                    offered = sender.get("event", "offer_done")
                    if not done["ok"]:
                        raise RuntimeError(f"transfer failed: {done}")
                    if i:  # the first one warms buffers and the link
                        seconds.append(done["seconds"])
                        cpus.append((offered.get("cpu_s", 0.0), done["cpu_s"]))
                    room += 1
                results[(tokens, size)] = pages * PAGE_BYTES[tokens] / statistics.median(
                    seconds) / 1e9
                if cpu is not None:
                    cpu[(tokens, size)] = tuple(1e3 * statistics.median(c[k] for c in cpus)
                                                for k in (0, 1))
    finally:
        sender.stop()
        receiver.stop()
    return results


def bare_goodput(env: dict, sizes: list[int], iters: int, mode: str = "tag",
                 depth: int = 1, split: int = 1) -> dict[int, float]:
    argv = [sys.executable, "-m", "bench._transfer_bare"]
    common = ["--sizes", ",".join(map(str, sizes)), "--iters", str(iters), "--mode", mode,
              "--depth", str(depth), "--split", str(split)]
    recv = Proc(argv + ["recv"] + common, env)
    port = recv.get("port")["port"]
    send = Proc(argv + ["send", "--port", str(port)] + common, env)
    try:
        return {size: recv.get("size", size)["gbps"] for size in sizes}
    finally:
        send.stop()
        recv.stop()


def perftest_goodput(env: dict, size: int, iters: int) -> float | None:
    libucx = Path(sys.executable).resolve().parent.parent / "lib" / \
        f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "libucx"
    tool = libucx / "bin" / "ucx_perftest"
    if not tool.exists():
        import libucx as module

        libucx = Path(module.__file__).parent
        tool = libucx / "bin" / "ucx_perftest"
    env = dict(env, LD_LIBRARY_PATH=str(libucx / "lib"))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    server = subprocess.Popen([str(tool), "-p", port, "-q"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            time.sleep(0.1)
            out = subprocess.run([str(tool), "127.0.0.1", "-p", port, "-t", "tag_bw", "-e",
                                  "-s", str(size), "-n", str(iters), "-w", "2", "-f"], env=env,
                                 capture_output=True, text=True, timeout=120)
            numbers = re.findall(r"^\s+\d+\s+.*$", out.stdout, re.M)
            if out.returncode == 0 and numbers:
                return float(numbers[-1].split()[5]) * MiB / 1e9  # MB/s column, MB = 2^20
    except subprocess.TimeoutExpired:
        return None
    finally:
        server.kill()
        server.wait()
    return None


def _median(samples: list[dict], key) -> float:
    return statistics.median(sample[key] for sample in samples)


def run(args) -> str:
    from bench import _transfer_report as report

    sizes = [16 * MiB, 64 * MiB] if args.quick else [1 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]
    iters = {s: (3 if args.quick else max(4, min(20, (320 * MiB) // s))) for s in sizes}
    rounds = 1 if args.quick else 3  # rounds alternate pdmesh and its baselines: noise hits all
    rows = []
    for transport in TRANSPORTS:
        env, ours, scattered, bare, link, split = _env(transport), [], [], [], [], []
        cpu: list[dict] = []
        for i in range(rounds):
            print(f"   {transport}: round {i + 1}/{rounds}", file=sys.stderr, flush=True)
            cpu.append({})
            ours.append(pdmesh_goodput(env, sizes, iters, cpu=cpu[-1]))
            scattered.append(pdmesh_goodput(env, sizes, iters, scattered=True))
            bare.append(bare_goodput(env, sizes, max(iters.values())))
            link.append(bare_goodput(env, sizes, max(iters.values()), mode="engine"))
            split.append(bare_goodput(env, sizes, max(iters.values()), mode="engine",
                                      split=SPLIT))
        perf = {s: perftest_goodput(env, s, iters[s] * 2) for s in sizes}
        for tokens in UCX_PAGE_TOKENS:
            for size in sizes:
                key = (tokens, size)
                rows.append(report.Row(
                    transport, tokens, _pages(tokens, size) * PAGE_BYTES[tokens],
                    _median(ours, key), _median(scattered, key),
                    _median(bare, size), _median(link, size), _median(split, size),
                    perf[size], NIXL.get((transport, tokens)) if size == 64 * MiB else None,
                    tuple(statistics.median(c[key][k] for c in cpu) for k in (0, 1))))
    explore = None if args.quick else report.explore(sys.modules[__name__])
    from bench import _fragmentation, _transfer_samehost

    print("   same host", file=sys.stderr, flush=True)
    same_host = _transfer_samehost.run(args.quick)
    return (report.markdown(rows, explore, plot=not args.quick)
            + report.fragmentation(_fragmentation.run(args.quick))
            + "\n\n#### Same host\n\n" + same_host)
