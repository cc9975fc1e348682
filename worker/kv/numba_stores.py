"""Streaming stores and shared inner loops for the compiled CPU loops (imported only where numba
is: by the loop definitions of copy_numba.py, pack_numba.py and sum_numba.py).

    store_streaming(arr, index, value)   # arr[index] = value, non-temporal (C-contiguous arr)
    fence()                              # every earlier store visible before any later one
    acc = copy_summed(src, dst, streaming)   # dst[:] = src, the words' sum; the loops' inner copy
    acc = sum_words(words)                   # the words' sum alone (the message checksum's)
    acc = copy_line_streaming(src, i, dst, k)  # one 64-byte line, one vector streaming store
    acc = copy_row_lines(src, i, dst, k, words)  # a row of whole lines that way (flat arrays)
    if lines_fit(dst, words): ...                # whether rows of `words` in dst start on lines

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


LINE_BYTES = 64  # a cache line: what copy_line_streaming moves


@intrinsic
def copy_line_streaming(typingctx, src, src_at, dst, dst_at):
    """Copy the 64 bytes of words src[src_at:] to dst[dst_at:] with one vector load and one
    non-temporal vector store; return the words' sum as uint64 (each word widened as
    `np.uint64(word)` does: signed words sign-extended), wrapping. 1-d C-contiguous arrays of
    one integer dtype; the caller makes sure 64 bytes lie there and that the destination's
    address is a multiple of 64 (an aligned streaming store faults otherwise). A whole line
    per store: the scalar loop's 8-byte streaming stores (MOVNTI) ran ~10% slower, and per-row
    array views cost ~90 ns a row (2 KiB rows of 1-token pages: a third of the copy)."""
    ok = (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.layout == "C"
          and dst.layout == "C" and src.ndim == 1 and dst.ndim == 1
          and isinstance(src.dtype, types.Integer) and src.dtype == dst.dtype
          and isinstance(src_at, types.Integer) and isinstance(dst_at, types.Integer))
    if not ok:
        return None
    bits = src.dtype.bitwidth
    lanes = LINE_BYTES * 8 // bits

    def codegen(context, builder, signature, args):
        vector = ir.VectorType(ir.IntType(bits), lanes)
        src_data = context.make_array(signature.args[0])(context, builder, args[0]).data
        dst_data = context.make_array(signature.args[2])(context, builder, args[2]).data
        line = builder.load(builder.bitcast(builder.gep(src_data, [args[1]]), vector.as_pointer()),
                            align=bits // 8)
        store = builder.store(line, builder.bitcast(builder.gep(dst_data, [args[3]]),
                                                    vector.as_pointer()), align=LINE_BYTES)
        store.set_metadata("nontemporal", builder.module.add_metadata(
            [ir.Constant(ir.IntType(32), 1)]))
        wide = ir.IntType(64)
        widen = builder.sext if signature.args[0].dtype.signed else builder.zext
        total = ir.Constant(wide, 0)
        for lane in range(lanes):
            word = builder.extract_element(line, ir.Constant(ir.IntType(32), lane))
            total = builder.add(total, word if bits == 64 else widen(word, wide))
        return total
    return types.uint64(src, src_at, dst, dst_at), codegen


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


@njit(inline="always", nogil=True, boundscheck=False, error_model="numpy")
def sum_words(words):
    """The sum of a contiguous 1-d word array (uint64, wrapping): copy_summed without the copy,
    vectorised the same way."""
    acc = np.uint64(0)
    for t in range(words.shape[0]):
        acc += np.uint64(words[t])
    return acc


@njit(inline="always", nogil=True, boundscheck=False, error_model="numpy")
def lines_fit(dst, words):
    """Whether every row of `words` words in `dst` (rows back to back from its start) starts on
    a cache line: what copy_row_lines needs of its destination."""
    return words % (LINE_BYTES // dst.itemsize) == 0 and dst.ctypes.data % LINE_BYTES == 0


@njit(inline="always", nogil=True, boundscheck=False, error_model="numpy")
def copy_row_lines(src, src_at, dst, dst_at, words):
    """dst[dst_at:dst_at + words] = src[src_at:src_at + words] a line at a time with
    copy_line_streaming (so its conditions, `lines_fit`: `words` fills whole lines, the
    destination starts on one); the words' sum (uint64, wrapping). The caller fences once at
    its end."""
    acc = np.uint64(0)
    step = LINE_BYTES // src.itemsize
    for w in range(0, words, step):
        acc += copy_line_streaming(src, src_at + w, dst, dst_at + w)
    return acc
