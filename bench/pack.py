"""Pack and unpack on CPU (the torch reference path) beside torch's own gathers and a plain copy.

One request's pages at random ids of a pool, every layer, K and V (DESIGN.md's staging order),
realistic geometry (32 layers, 8 KV heads, head dim 128, bf16) with 16-token pages (32 KiB pieces)
and 1-token pages (2 KiB pieces). For each: pdmesh `pack` / `unpack`; torch `index_select` /
`index_copy_` along the pool's page axis (what one writes first); and a plain `copy_` of the same
number of bytes between two contiguous buffers, the ceiling. Figures are payload GB/s (1e9 bytes
of staging buffer per second, one torch thread), the median of interleaved repeats.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from pdmesh.worker.kv.pack import pack, unpack

MiB = 1 << 20
LAYERS, HEADS, DIM, DTYPE = 32, 8, 128, torch.bfloat16


def _median_rate(fns: dict, nbytes: int, repeats: int) -> dict[str, float]:
    """Run the functions interleaved `repeats` times (after one warm-up each); GB/s medians."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: nbytes / statistics.median(t) / 1e9 for name, t in times.items()}


def _case(page_size: int, request_bytes: int, repeats: int) -> dict[str, float]:
    page_bytes = LAYERS * 2 * page_size * HEADS * DIM * DTYPE.itemsize
    pages = max(1, request_bytes // page_bytes)
    num_pages = pages * 2 + 8
    gen = torch.Generator().manual_seed(page_size)
    kv = torch.empty((LAYERS, 2, num_pages, page_size, HEADS, DIM), dtype=DTYPE)
    kv.view(torch.uint8).random_(generator=gen)
    ids = torch.randperm(num_pages, generator=gen)[:pages]
    staging = torch.empty((LAYERS, 2, pages, page_size, HEADS, DIM), dtype=DTYPE)
    other = staging.clone()
    nbytes = staging.numel() * staging.element_size()
    rates = _median_rate({
        "pack": lambda: pack(kv, ids, out=staging),
        "unpack": lambda: unpack(staging, kv, ids),
        "index_select": lambda: torch.index_select(kv, 2, ids, out=staging),
        "index_copy_": lambda: kv.index_copy_(2, ids, staging),
        "copy": lambda: other.copy_(staging),
    }, nbytes, repeats)
    rates["mib"] = nbytes / MiB
    return rates


def run(args) -> str:
    torch.set_num_threads(int(os.environ.get("PDMESH_TORCH_THREADS", "1")))
    sizes = [16 * MiB] if args.quick else [16 * MiB, 64 * MiB, 256 * MiB]
    repeats = 5 if args.quick else 11
    rows = []
    for page_size in (16, 1):
        for size in sizes:
            r = _case(page_size, size, repeats)
            rows.append(
                f"| {page_size} | {r['mib']:.0f} | {r['pack']:.2f} | {r['unpack']:.2f} | "
                f"{r['index_select']:.2f} | {r['index_copy_']:.2f} | {r['copy']:.2f} | "
                f"{r['pack'] / r['copy']:.2f} / {r['unpack'] / r['copy']:.2f} | "
                f"{r['pack'] / r['index_select']:.2f} / {r['unpack'] / r['index_copy_']:.2f} |")
    return "\n".join([
        "One request's pages at random ids, 32 layers x K,V, 8 KV heads, head dim 128, bf16; "
        "payload GB/s on one CPU thread (median of interleaved repeats). Baselines: torch "
        "`index_select` / `index_copy_` along the pool's page axis, and a plain `copy_` of the "
        "same bytes.",
        "",
        "| page tokens | MiB | pack | unpack | torch index_select | torch index_copy_ | copy | "
        "pack / unpack vs copy | pack / unpack vs torch |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "pdmesh's torch path moves whole pages as rows of 64-bit words (`index_select` / "
        "`index_copy_` along the page axis of the pool seen as [layers*2, pages, words]); the "
        "word view is what makes its unpack faster than torch's bf16 `index_copy_`. Small pieces "
        "(1-token pages: 2 KiB) cost per-row overhead; on CUDA the Triton kernels take over "
        "(see the GPU section).",
    ])
