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
