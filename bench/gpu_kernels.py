"""GPU pack/unpack figures: the Triton kernels beside a device-to-device copy and torch per layer.

For one request (every layer, K and V, random page ids from a pool twice its size) this times, with
`triton.testing.do_bench` (CUDA events, L2 flushed before each run, median):
- `copy`: `dst.copy_(src)` of a buffer as large as the staging buffer (the ceiling);
- `pack` / `unpack`: `pack_triton` / `unpack_triton`, one launch each;
- `index_select` / `index_copy_`: torch, one call per layer and per K/V (2 x layers calls),
  which is what a pack without a kernel of its own does.
Bandwidths count bytes read plus bytes written (2 x the staging bytes). Every case first checks the
kernels bit for bit against torch on the same data.
"""

from __future__ import annotations

import os
import time

import torch
import triton.testing

from pdmesh.worker.kv.pack_triton import pack_triton, unpack_triton

# "cuda" on the GPU machine; "cpu" with TRITON_INTERPRET=1 smoke-runs this code without a GPU.
DEVICE = os.environ.get("PDMESH_BENCH_DEVICE", "cuda")
MODEL = dict(layers=32, heads=8, head_dim=128, dtype=torch.bfloat16)  # a Llama-3-8B-like KV
FULL_CASES = [(512, 16), (512, 1), (512, 64), (8192, 16), (8192, 1), (8192, 64)]
QUICK_CASES = [(512, 16), (8192, 16)]
SWEEP_CASES = [(8192, 16), (8192, 1), (512, 16)]
SWEEP_TILES = [(tile, warps) for tile in (8192, 16384, 32768, 65536) for warps in (4, 8)]


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.current_stream().synchronize()


class _Done:
    def query(self) -> bool:
        return True


def event():
    """A CUDA event recorded now on the current stream (a finished stand-in on CPU)."""
    if DEVICE != "cuda":
        return _Done()
    ev = torch.cuda.Event()
    ev.record()
    return ev


def _bench(fn, rep_ms: int) -> float:
    """Median seconds of one call."""
    if DEVICE != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms,
                                   return_mode="median") / 1e3


class Case:
    """One request's pool, page ids and staging buffer on the GPU, random bits throughout."""

    def __init__(self, tokens: int, page_size: int, layers: int, heads: int, head_dim: int,
                 dtype: torch.dtype) -> None:
        self.tokens, self.page_size, self.layers = tokens, page_size, layers
        n = -(-tokens // page_size)
        pool_pages = 2 * n
        shape = (layers, 2, pool_pages, page_size, heads, head_dim)
        self.kv = torch.empty(shape, dtype=dtype, device=DEVICE)
        self.kv.view(torch.int16).random_(-(1 << 15), 1 << 15)
        self.ids = torch.randperm(pool_pages, device=DEVICE)[:n]
        self.out = torch.empty((layers, 2, n) + shape[3:], dtype=dtype, device=DEVICE)
        self.nbytes = self.out.numel() * self.out.element_size()

    def check(self) -> None:
        ints = torch.int16
        pack_triton(self.kv, self.ids, 0, self.layers, self.out)
        assert torch.equal(self.out.view(ints), self.kv[:, :, self.ids].view(ints)), "pack differs"
        before = self.kv.clone()
        self.out.view(ints).random_(-(1 << 15), 1 << 15)
        unpack_triton(self.out, self.kv, self.ids, 0, self.layers)
        for layer in range(self.layers):
            for half in (0, 1):
                before[layer, half].index_copy_(0, self.ids, self.out[layer, half])
        assert torch.equal(before.view(ints), self.kv.view(ints)), "unpack differs"
        del before

    def torch_pack(self) -> None:
        for layer in range(self.layers):
            for half in (0, 1):
                torch.index_select(self.kv[layer, half], 0, self.ids, out=self.out[layer, half])

    def torch_unpack(self) -> None:
        for layer in range(self.layers):
            for half in (0, 1):
                self.kv[layer, half].index_copy_(0, self.ids, self.out[layer, half])


def measure_case(tokens: int, page_size: int, rep_ms: int) -> dict:
    case = Case(tokens, page_size, **MODEL)
    case.check()
    src, dst = torch.empty_like(case.out), torch.empty_like(case.out)
    src.view(torch.int16).random_(-(1 << 15), 1 << 15)
    times = {
        "copy": _bench(lambda: dst.copy_(src), rep_ms),
        "pack": _bench(lambda: pack_triton(case.kv, case.ids, 0, case.layers, case.out), rep_ms),
        "unpack": _bench(lambda: unpack_triton(case.out, case.kv, case.ids, 0, case.layers), rep_ms),
        "index_select": _bench(case.torch_pack, rep_ms),
        "index_copy_": _bench(case.torch_unpack, rep_ms),
    }
    try:  # the public API (validation + dispatch) around the same kernels, where it imports
        from pdmesh.worker.kv import pack as api
        times["pack()"] = _bench(lambda: api.pack(case.kv, case.ids, out=case.out), rep_ms)
        times["unpack()"] = _bench(lambda: api.unpack(case.out, case.kv, case.ids), rep_ms)
    except ImportError:
        pass
    row = {"tokens": tokens, "page_size": page_size, "bytes": case.nbytes,
           "calls_torch": 2 * case.layers, "us": {k: v * 1e6 for k, v in times.items()},
           "tbps": {k: 2 * case.nbytes / v / 1e12 for k, v in times.items()}}
    del case, src, dst
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def sweep(rep_ms: int) -> list[dict]:
    """Pack and unpack bandwidth for each (tile bytes, warps): how the defaults were chosen."""
    rows = []
    for tokens, page_size in SWEEP_CASES:
        case = Case(tokens, page_size, **MODEL)
        for tile, warps in SWEEP_TILES:
            kw = dict(tile_bytes=tile, num_warps=warps)
            pack = _bench(lambda: pack_triton(case.kv, case.ids, 0, case.layers, case.out, **kw), rep_ms)
            unpack = _bench(lambda: unpack_triton(case.out, case.kv, case.ids, 0, case.layers, **kw),
                            rep_ms)
            rows.append({"tokens": tokens, "page_size": page_size, "tile_bytes": tile,
                         "num_warps": warps, "pack_tbps": 2 * case.nbytes / pack / 1e12,
                         "unpack_tbps": 2 * case.nbytes / unpack / 1e12})
        del case
    return rows


def kernel_table(rows: list[dict]) -> str:
    lines = ["| request | staging MiB | copy TB/s | pack TB/s (x copy) | unpack TB/s (x copy) "
             "| torch index_select TB/s | torch index_copy_ TB/s | pack vs index_select "
             "| unpack vs index_copy_ |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        t, us = r["tbps"], r["us"]
        lines.append(
            f"| {r['tokens']} tokens, page {r['page_size']} | {r['bytes'] / 2**20:.0f} "
            f"| {t['copy']:.2f} | {t['pack']:.2f} ({t['pack'] / t['copy']:.2f}) "
            f"| {t['unpack']:.2f} ({t['unpack'] / t['copy']:.2f}) "
            f"| {t['index_select']:.2f} | {t['index_copy_']:.2f} "
            f"| {us['index_select'] / us['pack']:.1f}x ({us['pack']:.0f} vs {us['index_select']:.0f} us) "
            f"| {us['index_copy_'] / us['unpack']:.1f}x ({us['unpack']:.0f} vs {us['index_copy_']:.0f} us) |")
    return "\n".join(lines)


def api_table(rows: list[dict]) -> str:
    """Time of the public `pack()`/`unpack()` beside the bare kernel launch (us per call)."""
    rows = [r for r in rows if "pack()" in r["us"]]
    if not rows:
        return ""
    lines = ["| request | pack_triton us | pack() us | unpack_triton us | unpack() us |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['tokens']} tokens, page {r['page_size']} | {r['us']['pack']:.0f} "
              f"| {r['us']['pack()']:.0f} | {r['us']['unpack']:.0f} | {r['us']['unpack()']:.0f} |"
              for r in rows]
    return "\n".join(lines)


def sweep_table(rows: list[dict]) -> str:
    lines = ["| request | tile bytes | warps | pack TB/s | unpack TB/s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['tokens']} tokens, page {r['page_size']} | {r['tile_bytes']} | {r['num_warps']} "
              f"| {r['pack_tbps']:.2f} | {r['unpack_tbps']:.2f} |" for r in rows]
    return "\n".join(lines)
