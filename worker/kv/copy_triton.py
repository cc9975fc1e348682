"""Triton kernel: copy a request's pages from one CUDA pool into another, checksum fused.

Both pools are contiguous [num_layers, 2, P, page_size, H, D] of one layout (P may differ), seen
as rows [num_layers * 2 * P, W] of integer words (one row = one page of K or V in one layer).
Staging row r of layers [a, b) (r = lc * n + j, lc = (layer - a) * 2 + kv) is pool row
(2a + lc) * P + ids[j] on each side. One launch per chunk of layers copies every row, whatever
the page count (tiles of ROWS rows x BLOCK words, int64 offsets, wide coalesced accesses), and
each program adds its rows' word sums weighted by (2 r + 1), r the row's place in the whole
request, into its own int64 slot; the slots'
sum (mod 2^64) is the checksum `pdmesh.worker.kv.page_copy` defines, so the copy and its
checksum are one pass over the bytes. A peer's pool mapped through CUDA IPC is an ordinary
device pointer here (NVLink/PCIe for a peer GPU).

`copy_pages_triton` trusts its caller (page_copy.py / samehost.py validate layouts and ids).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdmesh.worker.kv.page_copy import MASK64, word_dtype

_TILE_BYTES = 32768  # as pack_triton (bench/gpu.py --sweep)
_NUM_WARPS = 8
_MAX_GRID_Y = 65535


# the counts vary per request: one compiled kernel for all of them (a rank's warm-up
# compiles it; specialising on them compiled a new one on the first request of each kind)
@triton.jit(do_not_specialize=["num_rows", "n", "p_src", "p_dst", "first_lc"])
def _copy_rows_kernel(
    src_ptr,  # source pool rows [L * 2 * P_src, W] (integer words)
    dst_ptr,  # destination pool rows [L * 2 * P_dst, W]
    src_ids_ptr,  # [n] source page ids (int64), request order
    dst_ids_ptr,  # [n] destination page ids (int64)
    sums_ptr,  # [grid0 * grid1] int64: each program's weighted row sums
    num_rows,  # R = (b - a) * 2 * n
    n,  # pages in the request
    p_src,  # pages in the source pool
    p_dst,  # pages in the destination pool
    first_lc,  # 2 * a
    W,  # words in one row
    ROWS: tl.constexpr,  # rows per program (power of two)
    BLOCK: tl.constexpr,  # words of a row per program (power of two)
    EVEN: tl.constexpr,  # num_rows % ROWS == 0 and W % BLOCK == 0: no masks
):
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    rows = pid0 * ROWS + tl.arange(0, ROWS)  # [ROWS] staging rows
    cols = pid1 * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] words in a row
    row_ok = rows < num_rows
    lc = rows // n
    j = rows - lc * n
    if EVEN:
        s_page = tl.load(src_ids_ptr + j)
        d_page = tl.load(dst_ids_ptr + j)
    else:
        s_page = tl.load(src_ids_ptr + j, mask=row_ok, other=0)
        d_page = tl.load(dst_ids_ptr + j, mask=row_ok, other=0)
    layer_row = (first_lc + lc).to(tl.int64)
    src_off = (layer_row * p_src + s_page)[:, None] * W + cols[None, :]
    dst_off = (layer_row * p_dst + d_page)[:, None] * W + cols[None, :]
    if EVEN:
        vals = tl.load(src_ptr + src_off)
        tl.store(dst_ptr + dst_off, vals)
    else:
        mask = row_ok[:, None] & (cols < W)[None, :]
        vals = tl.load(src_ptr + src_off, mask=mask, other=0)
        tl.store(dst_ptr + dst_off, vals, mask=mask)
    row_sums = tl.sum(vals.to(tl.int64), axis=1)  # [ROWS]
    weighted = row_sums * (2 * (rows.to(tl.int64) + first_lc * n) + 1)  # place in the request
    tl.store(sums_ptr + pid0 * tl.num_programs(1) + pid1, tl.sum(weighted, axis=0))


def _tiles(num_rows: int, row_words: int, itemsize: int) -> tuple[int, int]:
    tile = max(16, _TILE_BYTES // itemsize)
    block = min(triton.next_power_of_2(row_words), tile)
    block = max(block, triton.next_power_of_2(triton.cdiv(row_words, _MAX_GRID_Y)))
    rows = min(max(1, tile // block), triton.next_power_of_2(num_rows))
    return rows, block


def copy_pages_triton(src_kv: torch.Tensor, dst_kv: torch.Tensor, src_ids: torch.Tensor,
                      dst_ids: torch.Tensor, a: int, b: int) -> int:
    """Copy layers [a, b) of pages src_ids -> dst_ids in one launch; the checksum (this waits
    for the kernel: the stream is synchronized, so the bytes are in place on return)."""
    sums = launch_copy(src_kv, dst_kv, src_ids, dst_ids, a, b)
    return 0 if sums is None else int(sums.sum()) & MASK64  # .item() waits for the kernel


def launch_copy(src_kv: torch.Tensor, dst_kv: torch.Tensor, src_ids: torch.Tensor,
                dst_ids: torch.Tensor, a: int, b: int) -> torch.Tensor | None:
    """Enqueue the copy of layers [a, b) on the current stream and return at once: the
    per-program checksum slots (device int64; their sum mod 2^64 is the checksum once the stream
    passed the kernel), or None when there is nothing to copy. Ids already on the device are
    used as they are (a transfer moves them there once)."""
    n = src_ids.numel()
    if n == 0 or a == b:
        return None
    word = word_dtype(src_kv)
    src = src_kv.view(torch.uint8).view(src_kv.shape[0] * 2 * src_kv.shape[2], -1).view(word)
    dst = dst_kv.view(torch.uint8).view(dst_kv.shape[0] * 2 * dst_kv.shape[2], -1).view(word)
    row_words = src.shape[1]
    num_rows = (b - a) * 2 * n
    rows, block = _tiles(num_rows, row_words, src.element_size())
    grid = (triton.cdiv(num_rows, rows), triton.cdiv(row_words, block))
    sums = torch.empty(grid[0] * grid[1], dtype=torch.int64, device=src.device)
    _copy_rows_kernel[grid](
        src, dst, src_ids.to(device=src.device, dtype=torch.int64),
        dst_ids.to(device=src.device, dtype=torch.int64), sums, num_rows, n, src_kv.shape[2],
        dst_kv.shape[2], 2 * a, row_words, ROWS=rows, BLOCK=block,
        EVEN=(num_rows % rows == 0 and row_words % block == 0), num_warps=_NUM_WARPS)
    return sums
