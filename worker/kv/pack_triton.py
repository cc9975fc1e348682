"""Triton kernels that pack (gather) and unpack (scatter) one request's KV pages in one launch.

The pool is one contiguous tensor `kv` [num_layers, 2, num_pages, page_size, H, D]. Seen as rows,
it is [num_layers * 2 * num_pages, E] with E = page_size * H * D elements, and every
(layer, K/V, page) is one contiguous row. The staging buffer of layers [a, b) and page ids `ids`
(request order) is `kv[a:b, :, ids]` made contiguous: rows [(b - a) * 2 * n, E], row
r = (layer - a, kv, i) taken from pool row (2 * a + r // n) * num_pages + ids[r % n].

So pack and unpack are one row copy between two row spaces, one kernel launched once: each
program copies a tile of ROWS staging rows by BLOCK elements, addressing with int64 offsets and
reading/writing whole rows with wide, coalesced accesses (Triton emits 16-byte vectors when E is a
multiple of 16 elements, which every real head dim gives). The tensors are reinterpreted as
integers of the same width, so the copy is bit-exact for every dtype (NaN payloads included).

The `*_summed` variants also checksum the staging buffer in the same pass, so a transfer makes no
second read of it: the rows are then copied as int64 words (a row of whole words, 8-byte aligned
tensors), and each program stores its tile's two sums of `pdmesh.worker.transfer.digest.parts`
(words, and words weighted by their 512-word block's place, staging word i in block i // 512),
summed into one int64 [2] on the device. Both sums wrap mod 2^64, so any order gives the same bits.

These functions trust their caller (`pdmesh.worker.kv.pack.pack/unpack` validate shapes, dtypes
and page-id bounds; duplicate ids in an unpack race, as they do in torch's `index_copy_`); they
check only what would make them write out of bounds, and return at once on empty input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["pack_triton", "pack_triton_summed", "unpack_triton", "unpack_triton_summed"]

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Bytes one program moves and its warps, from the H100 sweep (`python -m bench.gpu --sweep`):
# 8-64 KiB all ran at 0.95-0.98 of a copy; 32 KiB with 8 warps was best or within 1% in each case.
_TILE_BYTES = 32768
_NUM_WARPS = 8
_MAX_GRID_Y = 65535
_BLOCK_SHIFT = tl.constexpr(9)  # digest's blocks of 512 words
_BLOCK_MASK = tl.constexpr(511)


# the counts vary per request: one compiled kernel for all of them (a rank's warm-up
# compiles it; specialising on them compiled a new one on the first request of each kind)
@triton.jit(do_not_specialize=["num_rows", "n", "first_lc"])
def _page_rows_copy_kernel(
    src_ptr,  # pack: pool rows [L * 2 * P, E]; unpack: staging rows [R, E]  (integer view)
    dst_ptr,  # pack: staging rows [R, E];      unpack: pool rows [L * 2 * P, E]
    ids_ptr,  # [n] page ids of the request, in request order (any integer dtype)
    sums_ptr,  # SUMS: [programs, 2] int64, each program's (word sum, positional sum); else None
    num_rows,  # R = (b - a) * 2 * n staging rows
    n,  # pages in the request
    num_pages,  # P, pages in the pool
    first_lc,  # 2 * a: the pool's (layer, K/V) index of the range's first row
    E,  # elements in one row (page_size * H * D)
    ROWS: tl.constexpr,  # staging rows per program (power of two)
    BLOCK: tl.constexpr,  # elements of a row per program (power of two)
    EVEN_ROWS: tl.constexpr,  # num_rows % ROWS == 0: no row mask
    EVEN_COLS: tl.constexpr,  # E % BLOCK == 0: no column mask
    SCATTER: tl.constexpr,  # False: pool -> staging (pack); True: staging -> pool (unpack)
    SUMS: tl.constexpr,  # rows are int64 words (E of them): also sum them, as digest.parts does
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS] staging row indices
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] element offsets in a row
    row_ok = rows < num_rows
    lc = rows // n  # (layer - a) * 2 + kv
    page_idx = rows - lc * n
    if EVEN_ROWS:
        pages = tl.load(ids_ptr + page_idx).to(tl.int64)
    else:
        pages = tl.load(ids_ptr + page_idx, mask=row_ok, other=0).to(tl.int64)
    pool_rows = (first_lc + lc).to(tl.int64) * num_pages + pages
    staging_off = rows.to(tl.int64)[:, None] * E + cols[None, :]
    pool_off = pool_rows[:, None] * E + cols[None, :]
    if SCATTER:
        src_off = staging_off
        dst_off = pool_off
    else:
        src_off = pool_off
        dst_off = staging_off
    if EVEN_ROWS and EVEN_COLS:
        vals = tl.load(src_ptr + src_off)
        tl.store(dst_ptr + dst_off, vals)
    else:
        mask = row_ok[:, None] & (cols < E)[None, :]
        if SUMS:
            vals = tl.load(src_ptr + src_off, mask=mask, other=0)
        else:
            vals = tl.load(src_ptr + src_off, mask=mask)
        tl.store(dst_ptr + dst_off, vals, mask=mask)
    if SUMS:  # word i = row * E + col of the message weighs i // 512 + 1 (digest.parts)
        start = rows.to(tl.int64) * E  # [ROWS] index of each row's first word
        into = (start & _BLOCK_MASK).to(tl.int32)  # its place in its block
        past = (into[:, None] + cols[None, :]) >> _BLOCK_SHIFT  # [ROWS, BLOCK] blocks past it
        row_sums = tl.sum(vals, axis=1)  # [ROWS]
        slot = sums_ptr + 2 * (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1))
        tl.store(slot, tl.sum(row_sums, axis=0))
        tl.store(slot + 1, tl.sum(row_sums * ((start >> _BLOCK_SHIFT) + 1), axis=0)
                 + tl.sum(tl.sum(vals * past, axis=1), axis=0))


def _tiles(num_rows: int, row_elems: int, itemsize: int,
           tile_bytes: int = _TILE_BYTES) -> tuple[int, int]:
    """(ROWS, BLOCK): a tile of about `tile_bytes`, as wide as a row allows, never wider."""
    tile = max(16, tile_bytes // itemsize)
    block = min(triton.next_power_of_2(row_elems), tile)
    block = max(block, triton.next_power_of_2(triton.cdiv(row_elems, _MAX_GRID_Y)))
    rows = min(max(1, tile // block), triton.next_power_of_2(num_rows))
    return rows, block


def _launch(src: torch.Tensor, dst: torch.Tensor, kv: torch.Tensor, page_ids: torch.Tensor,
            layer_start: int, layer_end: int, scatter: bool, *, summed: bool = False,
            tile_bytes: int = _TILE_BYTES, num_warps: int = _NUM_WARPS) -> torch.Tensor | None:
    """Validate, then copy in one launch; with `summed`, the staging buffer's digest parts
    (int64 [2] on the device) where its rows are whole aligned words, else None."""
    if kv.dim() != 6:
        raise ValueError(f"kv must be [layers, 2, pages, page_size, heads, head_dim], got {tuple(kv.shape)}")
    num_layers, _, num_pages = kv.shape[:3]
    n = page_ids.numel()
    if not 0 <= layer_start <= layer_end <= num_layers:
        raise ValueError(f"layer range [{layer_start}, {layer_end}) is outside 0..{num_layers}")
    staging = dst if not scatter else src
    expected = (layer_end - layer_start, 2, n) + tuple(kv.shape[3:])
    if tuple(staging.shape) != expected or staging.dtype != kv.dtype:
        raise ValueError(f"staging must be {expected} {kv.dtype}, got {tuple(staging.shape)} {staging.dtype}")
    if not (kv.is_contiguous() and staging.is_contiguous()):
        raise ValueError("kv and the staging buffer must be contiguous")
    num_rows = (layer_end - layer_start) * 2 * n
    row_elems = kv.shape[3] * kv.shape[4] * kv.shape[5]
    if num_rows == 0 or row_elems == 0:  # an empty message: its parts are zeros
        return torch.zeros(2, dtype=torch.int64, device=kv.device) if summed else None
    row_bytes = row_elems * kv.element_size()
    words = summed and row_bytes % 8 == 0 and src.data_ptr() % 8 == 0 and dst.data_ptr() % 8 == 0
    if words:
        src, dst = (t.view(-1, row_elems).view(torch.int64) for t in (src, dst))
        row_elems, itemsize = row_bytes // 8, 8
    else:
        ints, itemsize = _INT_VIEW[kv.element_size()], kv.element_size()
        src, dst = src.view(ints), dst.view(ints)
    rows, block = _tiles(num_rows, row_elems, itemsize, tile_bytes)
    grid = (triton.cdiv(num_rows, rows), triton.cdiv(row_elems, block))
    sums = None
    if words:  # each program's two sums, added up below
        sums = torch.empty((grid[0] * grid[1], 2), dtype=torch.int64, device=kv.device)
    _page_rows_copy_kernel[grid](
        src, dst, page_ids.contiguous(), sums, num_rows, n, num_pages, 2 * layer_start, row_elems,
        ROWS=rows, BLOCK=block, EVEN_ROWS=num_rows % rows == 0, EVEN_COLS=row_elems % block == 0,
        SCATTER=scatter, SUMS=words, num_warps=num_warps)
    return None if sums is None else sums.sum(0)


def pack_triton(kv: torch.Tensor, page_ids: torch.Tensor, layer_start: int, layer_end: int,
                out: torch.Tensor, **tuning) -> torch.Tensor:
    """Gather `kv[layer_start:layer_end, :, page_ids]` into `out` (contiguous) in one launch."""
    _launch(kv, out, kv, page_ids, layer_start, layer_end, scatter=False, **tuning)
    return out


def pack_triton_summed(kv: torch.Tensor, page_ids: torch.Tensor, layer_start: int,
                       layer_end: int, out: torch.Tensor, **tuning) -> torch.Tensor | None:
    """`pack_triton`, and `digest.parts(out.view(torch.uint8))` from the same pass: int64 [2] on
    the device, queued on the current stream (no host sync). None where a row is not whole
    8-byte words or a tensor is not 8-byte aligned: the copy is done all the same, and the
    caller computes the parts with `digest.parts`."""
    return _launch(kv, out, kv, page_ids, layer_start, layer_end, scatter=False, summed=True,
                   **tuning)


def unpack_triton(staging: torch.Tensor, kv: torch.Tensor, page_ids: torch.Tensor,
                  layer_start: int, layer_end: int, **tuning) -> None:
    """Scatter `staging` back: `kv[layer_start:layer_end, :, page_ids] = staging`, one launch."""
    _launch(staging, kv, kv, page_ids, layer_start, layer_end, scatter=True, **tuning)


def unpack_triton_summed(staging: torch.Tensor, kv: torch.Tensor, page_ids: torch.Tensor,
                         layer_start: int, layer_end: int, **tuning) -> torch.Tensor | None:
    """`unpack_triton`, and `digest.parts(staging.view(torch.uint8))` from the same pass (the
    staging bytes as read, before the scatter): as `pack_triton_summed`, None where the copy
    ran without the sums."""
    return _launch(staging, kv, kv, page_ids, layer_start, layer_end, scatter=True, summed=True,
                   **tuning)
