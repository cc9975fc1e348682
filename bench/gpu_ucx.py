"""GPU memory over UCX: two processes on one GPU, a request's KV pool-to-pool beside bare sends.

Three measurements, each between two processes on the same GPU with UCX's CUDA transports:
- `bare`: a ucxx send of one CUDA buffer (a torch tensor), reused, one send in flight;
- `pipe`: a request's KV from one pool to another: Triton pack, stream synchronise, one ucxx
  send of the staging buffer, receive, Triton unpack, synchronise (the least a transfer does);
- `ucx_perftest -t tag_bw -m cuda`, UCX's own tool, from the libucx wheel.
Every ucxx run checks the bytes that arrived. Rates are payload bytes over wall time
(GB/s = 1e9 bytes/s), unlike the kernel figures, which count bytes read plus written.

    python -m bench.gpu_ucx {bare,pipe}-{send,recv} --port P --sizes N,.. --iters K  # one side
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

UCX_ENV = {"UCX_TLS": "cuda_copy,cuda_ipc,tcp,sm,self", "UCX_MM_ERROR_HANDLING": "y",
           "UCXPY_PROGRESS_MODE": "blocking"}
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, **UCX_ENV)
    for key in UCX_ENV:  # an explicit setting in the caller's environment wins
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _pair(role: str, sizes: list[int], iters: int, mode: str = "blocking", inflight: int = 1,
          timeout: float = 180, log: Path | None = None, extra_env: dict | None = None) -> list[dict]:
    """Start the receiver, then the sender (one connection for every size); the sender's figures."""
    port = _free_port()
    base = [sys.executable, "-m", "bench.gpu_ucx", "--port", str(port), "--sizes",
            ",".join(map(str, sizes)), "--iters", str(iters), "--inflight", str(inflight)]
    env = dict(_env(), UCXPY_PROGRESS_MODE=mode, **(extra_env or {}))
    recv = subprocess.Popen(base + [f"{role}-recv"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        seen = []
        for line in recv.stdout:  # UCX may print warnings on stdout first
            if line.strip() == "READY":
                break
            seen.append(line)
        else:
            raise RuntimeError(f"{role} receiver did not start: {''.join(seen)[-500:]!r}")
        send = subprocess.run(base + [f"{role}-send"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
        if send.returncode != 0:
            raise RuntimeError(f"{role} sender failed: {send.stderr[-2000:]}")
        rest, _ = recv.communicate(timeout=60)
        if log:
            log.write_text(f"== sender\n{send.stdout}\n{send.stderr}\n== receiver\n"
                           + "".join(seen) + rest)
        if recv.returncode != 0 or "RESULT ok" not in rest:
            raise RuntimeError(f"{role} receiver failed: {rest[-500:]!r}")
        rows = json.loads(send.stdout.strip().splitlines()[-1])
        for row in rows:
            row.update(mode=mode, inflight=inflight)
        return rows
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


def bare_send(sizes: list[int], iters: int, mode: str = "blocking", inflight: int = 1) -> list[dict]:
    """A ucxx send of one CUDA buffer per size (split in `inflight` concurrent sends)."""
    return _pair("bare", sizes, iters, mode, inflight)


def pipe_send(tokens: list[int], iters: int, mode: str = "blocking", inflight: int = 1) -> list[dict]:
    """Pack, send, receive, unpack a request of each token count, pool to pool, one after another."""
    return _pair("pipe", tokens, iters, mode, inflight)


def chunk_send(tokens: list[int], iters: int, mode: str = "blocking", chunks: int = 4) -> list[dict]:
    """The same in `chunks` layer ranges, packing, sending and unpacking overlapping."""
    return _pair("chunk", tokens, iters, mode, chunks)


def perftest(nbytes: int, iters: int, mem: str = "cuda") -> dict:
    """`ucx_perftest -t tag_bw -m cuda` between a server and a client process."""
    import libucx

    home = Path(libucx.__file__).parent
    exe = home / "bin" / "ucx_perftest"
    env = _env()
    env["LD_LIBRARY_PATH"] = f"{home / 'lib'}:{env.get('LD_LIBRARY_PATH', '')}"
    port = str(_free_port())
    args = ["-t", "tag_bw", "-m", mem, "-s", str(nbytes), "-n", str(iters), "-p", port]
    server = subprocess.Popen([str(exe)] + args, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(50):
            client = subprocess.run([str(exe), "127.0.0.1"] + args, env=env, capture_output=True,
                                    text=True, timeout=300)
            if client.returncode == 0 or "connect" not in (client.stdout + client.stderr).lower():
                break
            time.sleep(0.2)
        final = [ln for ln in client.stdout.splitlines() if ln.strip().startswith("Final:")]
        if client.returncode != 0 or not final:
            raise RuntimeError(f"ucx_perftest failed: {client.stdout[-1500:]} {client.stderr[-1500:]}")
        mib_per_s = float(final[-1].split()[6])  # overall bandwidth, UCX's "MB/s" = MiB/s
        return {"bytes": nbytes, "gbps": mib_per_s * 2**20 / 1e9, "raw": final[-1].strip()}
    finally:
        server.kill()
        server.wait()


# ---- the two sides (run in their own processes) -------------------------------------------

def _pattern(nbytes: int):
    import torch
    from bench.gpu_kernels import DEVICE
    return (torch.arange(nbytes, device=DEVICE, dtype=torch.int64) % 251).to(torch.uint8)


def _pool(tokens: int, seed: int):
    """A random pool twice the request's size and random page ids, the same for a seed."""
    import torch
    from bench.gpu_kernels import DEVICE, MODEL
    page_size = 16
    n = -(-tokens // page_size)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    kv = torch.empty((MODEL["layers"], 2, 2 * n, page_size, MODEL["heads"], MODEL["head_dim"]),
                     dtype=MODEL["dtype"], device=DEVICE)
    kv.view(torch.int16).random_(-(1 << 15), 1 << 15, generator=gen)
    ids = torch.randperm(2 * n, device=DEVICE, generator=gen)[:n]
    staging = torch.empty((MODEL["layers"], 2, n) + kv.shape[3:], dtype=kv.dtype, device=DEVICE)
    return kv, ids, staging


def _wire(t):
    """What ucxx sends: CUDA tensors by __cuda_array_interface__ (which torch exports for no
    bf16, hence the byte view), CPU tensors (smoke runs) by the buffer protocol."""
    flat = t.view(-1).view(__import__("torch").uint8)
    return flat if flat.is_cuda else flat.numpy()


class _Side:
    """One side's buffers for one size, and how it moves them once.

    bare: one buffer in `parts` concurrent sends. pipe: pack every layer, synchronise, send the
    staging buffer in `parts` concurrent sends; the receiver unpacks once all landed. chunk: the
    layers in `parts` ranges; the sender packs them all at once and sends each range as soon as
    its pack is done (a CUDA event), the receiver unpacks each range as it lands, so packing,
    sending and unpacking overlap, as a chunked transfer does.
    """

    def __init__(self, role: str, size: int, sender: bool, parts: int) -> None:
        import torch
        from bench.gpu_kernels import DEVICE
        self.role, self.size = role, size
        if role == "bare":
            self.buf = (_pattern(size) if sender
                        else torch.empty(size, dtype=torch.uint8, device=DEVICE))
            self.parts = [(None, None, w) for w in _wire(self.buf).chunk(parts)] if self.buf.is_cuda \
                else [(None, None, w) for w in __import__("numpy").array_split(_wire(self.buf), parts)]
            return
        self.kv, self.ids, self.buf = _pool(size, seed=1 if sender else 2)
        layers = self.kv.shape[0]
        cuts = [layers * i // parts for i in range(parts + 1)]
        self.parts = [(a, b, _wire(self.buf[a:b])) for a, b in zip(cuts, cuts[1:]) if b > a]

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()

    async def send(self, ep) -> None:
        from bench.gpu_kernels import event, sync
        from pdmesh.worker.kv.pack_triton import pack_triton
        if self.role == "pipe":
            pack_triton(self.kv, self.ids, 0, self.kv.shape[0], self.buf)
            sync()  # UCX is not stream-ordered: the bytes must be there before the send
        if self.role != "chunk":
            await asyncio.gather(*(ep.send(w) for _, _, w in self.parts))
            return
        done = []
        for a, b, _ in self.parts:
            pack_triton(self.kv, self.ids, a, b, self.buf[a:b])
            done.append(event())

        async def send_when_packed(ready, wire):
            while not ready.query():
                await asyncio.sleep(0)
            await ep.send(wire)
        await asyncio.gather(*(send_when_packed(r, w) for r, (_, _, w) in zip(done, self.parts)))

    async def recv(self, ep) -> None:
        from bench.gpu_kernels import sync
        from pdmesh.worker.kv.pack_triton import unpack_triton

        async def recv_part(a, b, wire):
            await ep.recv(wire)
            if self.role == "chunk":
                unpack_triton(self.buf[a:b], self.kv, self.ids, a, b)
        await asyncio.gather(*(recv_part(*p) for p in self.parts))
        if self.role == "pipe":
            unpack_triton(self.buf, self.kv, self.ids, 0, self.kv.shape[0])
        if self.role != "bare":
            sync()

    def arrived_intact(self) -> bool:
        import torch
        if self.role == "bare":
            return torch.equal(self.buf, _pattern(self.size))
        src_kv, src_ids, _ = _pool(self.size, seed=1)
        return torch.equal(self.kv[:, :, self.ids].view(torch.int16),
                           src_kv[:, :, src_ids].view(torch.int16))


WARMUP = 3
#: Peer-error handling on ucxx endpoints (pdmesh needs it; ucx_perftest runs without it).
_ERRH = os.environ.get("PDMESH_BENCH_UCX_ERRH", "1") == "1"


async def _send_side(role: str, port: int, sizes: list[int], iters: int, parts: int) -> None:
    import numpy as np
    import ucxx
    from bench.gpu_kernels import sync

    ep = await ucxx.create_endpoint("127.0.0.1", port, endpoint_error_handling=_ERRH)
    rows = []
    for size in sizes:
        side = _Side(role, size, sender=True, parts=parts)
        sync()
        for i in range(WARMUP + iters):
            if i == WARMUP:
                start = time.perf_counter()
            await side.send(ep)
        ack = np.zeros(1, dtype=np.int64)
        await ep.recv(ack)
        elapsed = time.perf_counter() - start
        rows.append({"role": role, "size": size, "bytes": side.nbytes, "iters": iters,
                     "ok": int(ack[0]), "s_per_iter": elapsed / iters,
                     "gbps": side.nbytes * iters / elapsed / 1e9})
        del side
    print(json.dumps(rows))
    await ep.close()


async def _recv_side(role: str, port: int, sizes: list[int], iters: int, parts: int) -> None:
    import numpy as np
    import ucxx

    done = asyncio.Event()
    result = {"ok": True}

    async def handler(ep):
        for size in sizes:
            side = _Side(role, size, sender=False, parts=parts)
            for _ in range(WARMUP + iters):
                await side.recv(ep)
            ok = side.arrived_intact()
            result["ok"] &= ok
            await ep.send(np.array([int(ok)], dtype=np.int64))
            del side
        done.set()

    listener = ucxx.create_listener(handler, port, endpoint_error_handling=_ERRH)
    print("READY", flush=True)
    await done.wait()
    await asyncio.sleep(0.1)
    listener.close()
    print("RESULT ok" if result["ok"] else "RESULT MISMATCH", flush=True)
    if not result["ok"]:
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=[f"{r}-{s}" for r in ("bare", "pipe", "chunk")
                                         for s in ("send", "recv")])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sizes", required=True, help="bytes (bare) or tokens (pipe), comma-separated")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--inflight", type=int, default=1,
                        help="concurrent sends per move (chunk: layer ranges)")
    args = parser.parse_args(argv)
    role, side = args.side.split("-")
    fn = _send_side if side == "send" else _recv_side
    sizes = [int(x) for x in args.sizes.split(",")]
    asyncio.run(fn(role, args.port, sizes, args.iters, args.inflight))
    return 0


if __name__ == "__main__":
    sys.exit(main())
