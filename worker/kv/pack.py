"""Pack a request's KV pages into one contiguous staging buffer, and unpack one into pages.

    staging = pack(kv, page_ids, layers=(a, b))     # kv[a:b, :, page_ids], contiguous
    unpack(staging, kv, page_ids, layers=(a, b))    # kv[a:b, :, page_ids] = staging

`kv` is a pool tensor [num_layers, 2, num_pages, page_size, num_kv_heads, head_dim] (layout.py);
the staging order is the one DESIGN.md fixes: for each layer, K pages then V pages, pages in the
request's order, i.e. shape [b - a, 2, len(page_ids), page_size, num_kv_heads, head_dim].

This module owns the public API and ALL validation (shapes, dtypes, devices, page ids: out of
range, or repeated in an unpack, is INVALID_ARGUMENT, never a crash; an empty request is fine).
The torch implementation below is the reference and runs on CPU; tensors on CUDA are handed to
`pdmesh.worker.kv.pack_triton` (`pack_triton(kv, page_ids, layer_start, layer_end, out)` and
`unpack_triton(staging, kv, page_ids, layer_start, layer_end)`, page_ids an int64 tensor on the
device, out/staging contiguous [b-a, 2, n, S, H, D]), imported lazily; without it, torch runs.

The torch path views layers [a, b) of the pool as [(b - a) * 2, num_pages, piece] (one row = one
page of K or V in one layer) in the widest integer word that divides a piece, and moves the
request's rows with one `index_select` / `index_copy_` along the page axis: never float
arithmetic (bits survive, NaN payloads included), and measured here `index_copy_` of words is
1.4-1.9x faster than of bf16 elements while `index_select` is as fast or faster (bench/pack.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from pdmesh.errors import InvalidArgument
from pdmesh.reasons import Reason
from pdmesh.worker.kv import pack_numba

PageIds = Sequence[int] | torch.Tensor | np.ndarray
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def pack(kv: torch.Tensor, page_ids: PageIds, layers: tuple[int, int] | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather pages `page_ids` of layers [a, b) into `out` (allocated if None); return it
    shaped [b - a, 2, n, page_size, num_kv_heads, head_dim]."""
    a, b = _check_pool(kv, layers)
    ids = check_page_ids(kv, page_ids, unique=False)
    shape = (b - a, 2, ids.numel()) + tuple(kv.shape[3:])
    if out is None:
        out = torch.empty(shape, dtype=kv.dtype, device=kv.device)
    else:
        out = _check_buffer(out, kv, shape, "out")
    pack_checked(kv, ids, a, b, out)
    return out


def unpack(staging: torch.Tensor, kv: torch.Tensor, page_ids: PageIds,
           layers: tuple[int, int] | None = None) -> None:
    """Scatter `staging` ([b - a, 2, n, S, H, D] or any contiguous tensor of that many elements)
    into pages `page_ids` (distinct) of layers [a, b) of `kv`."""
    a, b = _check_pool(kv, layers)
    ids = check_page_ids(kv, page_ids, unique=True)
    shape = (b - a, 2, ids.numel()) + tuple(kv.shape[3:])
    unpack_checked(_check_buffer(staging, kv, shape, "staging"), kv, ids, a, b)


def pack_checked(kv: torch.Tensor, ids: torch.Tensor, a: int, b: int, out: torch.Tensor,
                 summed: bool = False) -> torch.Tensor | None:
    """`pack` without its validation, for a caller that validated once for many calls (the KV
    sender, per chunk): `ids` from `check_page_ids`, `out` contiguous [b - a, 2, n, S, H, D].
    With `summed`, also `digest.parts` of `out` taken in the pack's own pass, int64 [2] on the
    pool's device with no host wait (a GPU's Triton kernel, a CPU's compiled loop), or None
    where the pack ran without it (rows not whole aligned 64-bit words; torch)."""
    if out.numel() == 0:
        return None
    if kv.is_cuda and _triton() is not None:
        if summed:
            return _triton().pack_triton_summed(kv, ids, a, b, out)
        _triton().pack_triton(kv, ids, a, b, out)
        return None
    if summed and _compiled_loop(kv, out):
        return pack_numba.pack_summed(*_word_rows(kv, a, b, out), ids)
    pool_rows, out_rows = _rows(kv, a, b, out)
    torch.index_select(pool_rows, 1, ids, out=out_rows)
    return None


def unpack_checked(staging: torch.Tensor, kv: torch.Tensor, ids: torch.Tensor, a: int, b: int,
                   summed: bool = False) -> torch.Tensor | None:
    """`unpack` without its validation (ids distinct and in range, staging of the right size);
    `summed` as in `pack_checked`, the parts of `staging` as read."""
    if staging.numel() == 0:
        return None
    if kv.is_cuda and _triton() is not None:
        if summed:
            return _triton().unpack_triton_summed(staging, kv, ids, a, b)
        _triton().unpack_triton(staging, kv, ids, a, b)
        return None
    if summed and _compiled_loop(kv, staging):
        return pack_numba.unpack_summed(*_word_rows(kv, a, b, staging), ids)
    pool_rows, staging_rows = _rows(kv, a, b, staging)
    pool_rows.index_copy_(1, ids, staging_rows)
    return None


def _compiled_loop(kv: torch.Tensor, staging: torch.Tensor) -> bool:
    """Whether pack_numba's loop moves this CPU pool's rows: whole 64-bit words, 8-byte aligned,
    numba present."""
    row_bytes = math.prod(kv.shape[3:]) * kv.element_size()
    return (not kv.is_cuda and row_bytes % 8 == 0 and kv.data_ptr() % 8 == 0
            and staging.data_ptr() % 8 == 0 and pack_numba.kernel() is not None)


def _word_rows(kv: torch.Tensor, a: int, b: int, staging: torch.Tensor):
    """Layers [a, b) of the pool as [2 (b - a), pages, words] and the staging buffer as
    [2 (b - a), n, words], int64 words."""
    sides = 2 * (b - a)
    return (kv[a:b].view(torch.uint8).view(sides, kv.shape[2], -1).view(torch.int64),
            staging.view(torch.uint8).view(sides, staging.shape[2], -1).view(torch.int64))


def staging_shape(kv: torch.Tensor, num_pages: int, layers: tuple[int, int] | None = None
                  ) -> tuple[int, ...]:
    a, b = _check_pool(kv, layers)
    return (b - a, 2, num_pages) + tuple(kv.shape[3:])


# -- validation -------------------------------------------------------------------------------

def _check_pool(kv: torch.Tensor, layers: tuple[int, int] | None) -> tuple[int, int]:
    if not isinstance(kv, torch.Tensor) or kv.dim() != 6 or kv.shape[1] != 2:
        raise InvalidArgument(
            "kv must be a pool tensor [num_layers, 2, num_pages, page_size, num_kv_heads, "
            f"head_dim], got {getattr(kv, 'shape', type(kv).__name__)}", reason=Reason.INVALID_KV_TENSOR)
    if not kv.is_contiguous():
        raise InvalidArgument("kv pool tensor must be contiguous", reason=Reason.INVALID_KV_TENSOR)
    num_layers = kv.shape[0]
    if layers is None:
        return 0, num_layers
    try:
        a, b = (int(x) for x in layers)
    except (TypeError, ValueError):
        raise InvalidArgument(f"layers must be a pair (start, end), got {layers!r}",
                              reason=Reason.INVALID_LAYER_RANGE) from None
    if not 0 <= a <= b <= num_layers:
        raise InvalidArgument(f"layer range [{a}, {b}) is outside [0, {num_layers})",
                              reason=Reason.INVALID_LAYER_RANGE,
                              metadata={"start": a, "end": b, "num_layers": num_layers})
    return a, b


def check_page_ids(kv: torch.Tensor, page_ids: PageIds, unique: bool) -> torch.Tensor:
    """`page_ids` as an int64 tensor on kv's device, or INVALID_ARGUMENT (out of range, not
    integers, repeated when `unique`)."""
    return torch.from_numpy(checked_page_array(kv, page_ids, unique)).to(kv.device)


def checked_page_array(kv: torch.Tensor, page_ids: PageIds, unique: bool) -> np.ndarray:
    """`page_ids` as a fresh 1-d int64 numpy array on the host, checked as `check_page_ids`
    checks them: what a transfer's control path keeps. No tensor (so no host wait for a device
    copy) and no Python int per page: a request of 8,192 one-token pages cost ~1.4 ms per check
    as a list of ints, ~0.35 ms here (most of it reading a list the caller passed; ~10 us for a
    tensor, an array or a protobuf repeated field)."""
    if isinstance(page_ids, torch.Tensor):
        if page_ids.dim() != 1 or page_ids.dtype.is_floating_point or page_ids.dtype == torch.bool:
            raise InvalidArgument("page ids must be a 1-d integer tensor",
                                  reason=Reason.INVALID_PAGE_IDS)
        values = page_ids.to(device="cpu", dtype=torch.int64).numpy().copy()
    else:
        if not hasattr(page_ids, "__len__"):  # an iterator: its values, once
            page_ids = list(page_ids)
        try:
            values = np.array(page_ids)
        except (TypeError, ValueError, OverflowError):
            values = np.array(None)  # not a sequence of numbers: refused below
        if values.size == 0:
            values = np.zeros(0, dtype=np.int64)
        if values.ndim != 1 or values.dtype.kind not in "iu":  # floats, bools, objects, nesting
            raise InvalidArgument("page ids must be integers", reason=Reason.INVALID_PAGE_IDS)
        values = values.astype(np.int64)  # a copy: the caller's list or array stays theirs
    num_pages = kv.shape[2]
    if values.size:
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= num_pages:  # (uint64 ids past 2^63 wrapped negative: refused here)
            raise InvalidArgument(
                f"page ids must lie in [0, {num_pages}), got min {lo} max {hi}",
                reason=Reason.PAGE_ID_OUT_OF_RANGE, metadata={"min": lo, "max": hi, "num_pages": num_pages})
        if unique and _repeats(values, num_pages):
            raise InvalidArgument("page ids of an unpack must be distinct",
                                  reason=Reason.DUPLICATE_PAGE_IDS)
    return values


def _repeats(values: np.ndarray, num_pages: int) -> bool:
    """Whether in-range ids repeat: a set for a few, else a bitmap of the pool's pages."""
    if values.size <= 256:
        return len(set(values.tolist())) != values.size
    seen = np.zeros(num_pages, dtype=np.bool_)
    seen[values] = True
    return int(np.count_nonzero(seen)) != values.size


def ids_on(values: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Checked page ids as an int64 tensor on `device`, queued on the current stream without a
    host wait: a transfer's hot path never waits for the device's queue to drain. On the CPU the
    tensor shares the array's memory (checked arrays are never written). For a GPU the ids go
    through a pinned buffer of torch's caching host allocator (a copy from pageable memory
    waits for the stream first; the pinned block is kept until the copy ran), so kernels queued
    after it on the same stream see them."""
    host = values if isinstance(values, torch.Tensor) else torch.from_numpy(
        np.ascontiguousarray(values, dtype=np.int64))
    if device.type == "cpu":
        return host
    pinned = torch.empty(host.shape, dtype=torch.int64, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)


def _check_buffer(buf: torch.Tensor, kv: torch.Tensor, shape: tuple[int, ...], name: str
                  ) -> torch.Tensor:
    if not isinstance(buf, torch.Tensor):
        raise InvalidArgument(f"{name} must be a tensor", reason=Reason.INVALID_STAGING_BUFFER)
    numel = 1
    for s in shape:
        numel *= s
    problems = []
    if buf.dtype != kv.dtype:
        problems.append(f"dtype {buf.dtype} != pool dtype {kv.dtype}")
    if buf.device != kv.device:
        problems.append(f"device {buf.device} != pool device {kv.device}")
    if buf.numel() != numel:
        problems.append(f"{buf.numel()} elements != {numel} for shape {list(shape)}")
    if not buf.is_contiguous():
        problems.append("not contiguous")
    if problems:
        raise InvalidArgument(f"{name} buffer does not fit the request: " + "; ".join(problems),
                              reason=Reason.INVALID_STAGING_BUFFER)
    return buf.view(shape)


# -- torch reference --------------------------------------------------------------------------

def _rows(kv: torch.Tensor, a: int, b: int, buf: torch.Tensor):
    """Layers [a, b) of the pool as [(b - a) * 2, num_pages, words] and the buffer as
    [(b - a) * 2, n, words]: one row per page of K or V per layer, in integer words."""
    piece_bytes = kv[0, 0, 0].numel() * kv.element_size()
    word = next(w for n, w in _WORDS if piece_bytes % n == 0)
    sides = 2 * (b - a)
    pool_rows = kv[a:b].view(torch.uint8).view(sides, kv.shape[2], piece_bytes).view(word)
    buf_rows = buf.view(torch.uint8).view(sides, -1, piece_bytes).view(word)
    return pool_rows, buf_rows


_TRITON: object | None = None
_TRITON_LOOKED = False


def _triton():
    """`pdmesh.worker.kv.pack_triton`, or None where it is not installed (torch then runs)."""
    global _TRITON, _TRITON_LOOKED
    if not _TRITON_LOOKED:
        try:
            from pdmesh.worker.kv import pack_triton as module
        except ModuleNotFoundError as err:
            if err.name not in ("pdmesh.worker.kv.pack_triton", "triton"):
                raise
            module = None
        _TRITON, _TRITON_LOOKED = module, True
    return _TRITON
