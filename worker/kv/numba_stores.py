"""Streaming stores for the compiled CPU loops (imported only where numba is: by the loop
definitions of copy_numba.py and pack_numba.py).

    store_streaming(arr, index, value)   # arr[index] = value, non-temporal (C-contiguous arr)
    fence()                              # every earlier store visible before any later one
    acc = copy_summed(src, dst, streaming)   # dst[:] = src, the words' sum; the loops' inner copy

A normal store first reads the destination line into the cache; a non-temporal store writes it
straight to memory (x86 MOVNTI; on other targets what LLVM lowers the hint to, at worst a plain
store), which saves a third of the memory traffic of a copy much larger than the cache and
leaves the cache to others. Such stores are weakly ordered: a loop that makes them ends with
`fence()` before it reports its copy done. Module-level, so a loop's numba cache entry names
this module instead of a fresh object per process (an intrinsic made inside the loop's
definition never hit the cache).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def store_streaming(typingctx, arr, index, value):
    if not isinstance(arr, types.Array) or arr.layout != "C":
        return None  # the store indexes the data pointer: contiguous arrays only
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        store = builder.store(args[2], builder.gep(data, [args[1]]))
        store.set_metadata("nontemporal", builder.module.add_metadata(
            [ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return types.void(arr, index, value), codegen


@intrinsic
def fence(typingctx):
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")  # x86: MFENCE, which also orders non-temporal stores
        return context.get_dummy_value()
    return types.void(), codegen


@njit(inline="always", nogil=True, boundscheck=False, error_model="numpy")
def copy_summed(src, dst, streaming):
    """dst[:] = src (equal-length contiguous 1-d word arrays), returning the sum of the words
    (uint64, wrapping); `streaming`: with streaming stores (the caller fences once at its end).
    A zero-based loop over whole slices: LLVM vectorises it (a loop over an offset range ran
    ~1.7x slower)."""
    acc = np.uint64(0)
    if streaming:
        for t in range(src.shape[0]):
            x = src[t]
            store_streaming(dst, t, x)
            acc += np.uint64(x)
    else:
        for t in range(src.shape[0]):
            x = src[t]
            dst[t] = x
            acc += np.uint64(x)
    return acc
