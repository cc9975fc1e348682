"""KV transfer of CUDA pools over UCX's CUDA transports, two processes on one GPU.

The sender and receiver (worker/transfer) pack, checksum and unpack CUDA tensors with the Triton
kernels and hand CUDA staging buffers to ucxx; this runs the pair the GPU benchmark runs
(bench/gpu_engine.py) for a small request and checks every byte that arrived. Skipped where no
CUDA device exists.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]


@pytest.mark.parametrize("layers_per_chunk,pages", [(0, "scattered"), (5, "scattered"),
                                                    (0, "one-run")])
def test_cuda_pool_to_pool_over_ucx(layers_per_chunk, pages):
    from bench import gpu_engine
    rows = gpu_engine.run([512, 48], iters=2, layers_per_chunk=layers_per_chunk, timeout=120,
                          pages=pages)
    assert [(r["tokens"], r["ok"]) for r in rows] == [(512, True), (48, True)]
    assert rows[0]["bytes"] == 512 * 32 * 2 * 8 * 128 * 2


@pytest.fixture(scope="module")
def cuda_pair():
    """A loopback sender and receiver with CUDA pools on the one GPU, path auto (same host)."""
    import os
    import sys

    from bench.transfer import Proc
    env = dict(os.environ, PDMESH_KV_TRANSFER_PATH="auto", PDMESH_TORCH_THREADS="1")
    base = [sys.executable, "-m", "pdmesh.worker.transfer.loopback"]
    args = ["--device", "cuda", "--pages", "256", "--layout", "4,16,8,128,bf16"]
    sender, receiver = Proc(base + ["sender"] + args, env), Proc(base + ["receiver"] + args, env)
    try:
        address = sender.get("event", "ready", timeout=120)["address"]
        receiver.get("event", "ready", timeout=120)
        yield sender, receiver, address
    finally:
        sender.stop()
        receiver.stop()


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_same_host_cuda_pool_to_pool_is_bit_exact(cuda_pair, dtype):
    """Two processes on one GPU: the prefill writes straight into the decode's CUDA pool (CUDA
    IPC, one Triton launch per chunk); every byte checked, for 1-, 16- and 64-token pages,
    several rooms at once, and both pools full afterwards."""
    sender, receiver, address = cuda_pair
    room = {"bf16": 1000, "fp16": 2000, "fp32": 3000}[dtype]
    for page in (1, 16, 64):
        layout, pages = f"4,{page},8,128,{dtype}", max(1, 512 // page)
        rooms = [room + page * 10 + i for i in range(3)]
        common = {"layout": layout, "pool_pages": len(rooms) * pages + 8, "pages": pages}
        for r in rooms:
            sender.send(op="offer", room=r, fill=True, timeout=60, **common)
            offered = sender.get("room", r, timeout=60)  # "offered", or "offer_done" if it failed
            assert offered["event"] == "offered", offered
        receiver.send(op="fetch", address=address, rooms=rooms, verify=True, timeout=60, **common)
        done = [receiver.get("event", "fetch_done", timeout=120) for _ in rooms]
        assert all(d["ok"] and d["verified"] and d["path"] == "samehost" for d in done), done
        assert all(sender.get("event", "offer_done")["ok"] for _ in rooms)
        for proc in (sender, receiver):
            proc.send(op="pool", **common)
            pool = proc.get("event", "pool")
            assert pool["free"] == pool["total"]


def test_after_the_warm_up_a_same_host_transfer_compiles_no_copy_kernel():
    """A GPU prefill rank's warm-up (`samehost_copy.warm`, one page into another of its pool) must
    leave the Triton copy compiled for what a transfer launches: a request's ids put on the
    device by the copier, another pool of another size as the destination. (The warm-up once
    passed a view into one ids tensor, which Triton compiles apart from a fresh one: a fresh
    mesh's first transfer compiled the copy, ~130 ms on the H100.)"""
    import asyncio

    from pdmesh.worker.kv import copy_triton
    from pdmesh.worker.kv.page_copy import CopyPlan, checksum_pages
    from pdmesh.worker.transfer import samehost_copy

    shape = (4, 2, 37, 16, 8, 128)
    src = torch.randn(shape, device="cuda").to(torch.bfloat16)
    dst = torch.zeros((4, 2, 64, 16, 8, 128), dtype=torch.bfloat16, device="cuda")
    asyncio.run(samehost_copy.warm(src, [0, 1]))
    kernels = copy_triton._copy_rows_kernel.device_caches[torch.cuda.current_device()][0]
    warmed = dict(kernels)
    src_ids, dst_ids = torch.arange(3, 35), torch.randperm(64)[:32]
    plan = CopyPlan(src_ids, dst_ids)

    async def transfer() -> int:
        copier = samehost_copy.make_copier(src, dst, plan, None, 1)
        await copier.chunk(None, 0, 4, 4 * 2 * 32 * 16 * 8 * 128 * 2)
        return await copier.settle()
    value = asyncio.run(transfer())
    assert dict(kernels) == warmed  # nothing compiled on the request path
    assert torch.equal(dst[:, :, dst_ids.cuda()], src[:, :, src_ids.cuda()])
    assert value == checksum_pages(src, src_ids.cuda(), 0, 4)
