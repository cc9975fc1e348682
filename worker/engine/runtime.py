"""Process-level torch settings that every entry point using torch applies first, and that
every thread running torch ops takes on (`apply_torch_threads`, an executor's initializer)."""

from __future__ import annotations

import os

import torch

_configured: int | None = None  # the count configure_torch_threads set, for apply_torch_threads


def configure_torch_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads from `threads`, else PDMESH_TORCH_THREADS (default 1).

    Call once at process entry. The thread count is also part of what makes results bit-exact
    between processes (see engine.py), so every process of a test or a mesh uses the same value.
    """
    if threads is None:
        threads = int(os.environ.get("PDMESH_TORCH_THREADS", "1"))
    if threads < 1:
        raise ValueError(f"PDMESH_TORCH_THREADS must be >= 1, got {threads}")
    global _configured
    torch.set_num_threads(threads)
    _configured = threads
    return threads


def apply_torch_threads() -> None:
    """Give the calling thread the process's intra-op thread count (configure_torch_threads'
    value, else what torch reports). Use it as the initializer of every executor whose threads
    run torch ops: OpenMP keeps the count per thread, and a thread that never set it runs its
    CPU ops as it defaults. Measured on the H100 (`python -m bench._gpu_thread_gap`, the bench-kv
    prefill, launch-bound, 512 / 2048 tokens, medians of 8 interleaved): 34-39 ms on a worker
    thread, 25-29 on a worker that set torch's count again, 30-33 on the main thread; an earlier
    run of `bench._gpu_compute_gap` had the main thread at 23.0 / 25.0 ms and an engine thread
    like a rank's at 31.9 / 32.8, the size of the gap between a prefill rank's compute and the
    same model in the benchmark's process (README, GPU TTFT). The rank's own figure with this
    applied is not measured yet."""
    torch.set_num_threads(_configured or torch.get_num_threads())
