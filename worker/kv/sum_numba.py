"""The transfer checksum's parts of one contiguous message as one compiled loop (CPU).

    run = kernel()                        # the compiled loop, or None without numba
    run(words, block_words, out, row)     # out[row] = (sum of block sums, positional sum)

`words` is the message as a 1-d C-contiguous int64 array; the parts are those of
worker/transfer/digest.py (`parts`): the words summed per block of `block_words`, then
(sum of the block sums, sum of block sum * (block index + 1)), mod 2^64, a last partial block
counting as a block. Written as uint64 into row `row` of `out` ([k, 2] uint64), so a chunk's
messages fill one array.

Why a compiled loop for one message: a direct message (a run of pages sent from or received into
the pool in place) is summed as soon as it has been sent or has landed, right after the kernel's
or UCX's copy of its bytes (worker/transfer/streams.py). From the cache this loop sums 1 MiB in
~12-17 us (60-90 GB/s), where torch's reduction runs at ~30 GB/s and costs ~10 op calls a
message; from memory both run at what one core gets (~25 GB/s alone here, ~12 beside the other
process's socket copies). Compiled once per process on first use (a rank's warm-up sums a
message; numba_kernel.py), the GIL released.
"""

from __future__ import annotations

from pdmesh.worker.kv.numba_kernel import LazyKernel


def _define():
    import numpy as np

    from pdmesh.worker.kv import numba_stores

    def message_parts(words, block_words, out, row):
        total = np.uint64(0)
        positional = np.uint64(0)
        block = 0
        for start in range(0, words.shape[0], block_words):
            # a whole slice of a C array: LLVM vectorises the sum (an offset range did not)
            acc = numba_stores.sum_words(words[start:start + block_words])
            block += 1
            total += acc
            positional += acc * np.uint64(block)
        out[row, 0] = total
        out[row, 1] = positional

    return message_parts


kernel = LazyKernel(_define, "the message checksum")
