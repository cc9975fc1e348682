"""Process-level torch settings that every entry point using torch applies first."""

from __future__ import annotations

import os

import torch


def configure_torch_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads from `threads`, else PDMESH_TORCH_THREADS (default 1).

    Call once at process entry. The thread count is also part of what makes results bit-exact
    between processes (see engine.py), so every process of a test or a mesh uses the same value.
    """
    if threads is None:
        threads = int(os.environ.get("PDMESH_TORCH_THREADS", "1"))
    if threads < 1:
        raise ValueError(f"PDMESH_TORCH_THREADS must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads
