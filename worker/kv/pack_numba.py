"""The CPU pack and unpack as one compiled loop that also sums the staging buffer's words.

    sums = pack_summed(pool_words, buf_words, ids)     # pool rows -> buffer
    sums = unpack_summed(pool_words, buf_words, ids)   # buffer -> pool rows

`pool_words` is [sides, pages, words] and `buf_words` [sides, n, words] of one integer word dtype
(pack.py's `_rows` with 64-bit words): buffer row (side, j) is pool row (side, ids[j]). While
each word is in a register it is stored and added to two sums over the buffer, read as one
message of 64-bit words w[i]: (sum of w[i], sum of w[i] * (i // BLOCK_WORDS + 1)), mod 2^64.
Those are the transfer's checksum parts of the packed message (worker/transfer/digest.py), so a
packed chunk is checksummed without a second pass over its bytes; on the receiver the same for
the unpack. The torch path (index_select / index_copy_, then digest.parts) is the reference
and the fallback where numba is missing (pack.py chooses). Compiled once on first use (a rank's
warm-up packs a page; numba_kernel.py), the GIL released for the whole chunk. A large unpack
writes the pool with streaming stores (`STREAMING_MIN_BYTES`).
"""

from __future__ import annotations

import torch

from pdmesh.worker.kv.numba_kernel import LazyKernel

BLOCK_WORDS = 512  # the checksum's blocks of 64-bit words (wire.checksum; pack_triton's too)
# An unpack of at least this many bytes stores into the pool with streaming stores
# (numba_stores.py): its rows are not read again soon, and a normal store reads each destination
# line first (64 MiB of 16-token pages at scattered ids: 8.1 -> 13.6-14.5 GB/s here), and where
# pool rows start on cache lines a whole line per store on flat offsets (8 MiB of 16-token pages:
# 0.55-0.68 -> 0.31-0.33 ms in one process, alternating). The pack keeps normal stores: UCX reads
# the staging buffer right after.
STREAMING_MIN_BYTES = 4 << 20


def _define():
    import numpy as np

    from pdmesh.worker.kv import numba_stores

    def move_rows(pool, buf, ids, to_buf, block_words, streaming):
        """Copy rows between pool [sides, P, words] and buf [sides, n, words] (to_buf: pool ->
        buf), returning the buffer's (word sum, block-weighted word sum) as uint64.
        `streaming` (unpack only): store into the pool with streaming stores, a whole cache
        line per store where every pool row starts on a line (flat offsets: no array view per
        row and block)."""
        sides, n, words = buf.shape[0], buf.shape[1], buf.shape[2]
        pages = pool.shape[1]
        # the message's checksum blocks cut rows too: they must also end on lines
        lines = (streaming and not to_buf and numba_stores.lines_fit(pool, words)
                 and numba_stores.lines_fit(pool, block_words))
        flat_pool, flat_buf = pool.reshape(pool.size), buf.reshape(buf.size)
        total = np.uint64(0)
        positional = np.uint64(0)
        i = 0  # the word's index in the buffer (the message)
        for side in range(sides):
            for j in range(n):
                row = (side * pages + ids[j]) * words
                w = 0
                while w < words:
                    block = i // block_words
                    seg = min(words - w, (block + 1) * block_words - i)
                    if lines:
                        acc = numba_stores.copy_row_lines(flat_buf, i, flat_pool, row + w, seg)
                    elif to_buf:
                        acc = numba_stores.copy_summed(flat_pool[row + w:row + w + seg],
                                                       flat_buf[i:i + seg], streaming)
                    else:
                        acc = numba_stores.copy_summed(flat_buf[i:i + seg],
                                                       flat_pool[row + w:row + w + seg], streaming)
                    total += acc
                    positional += acc * np.uint64(block + 1)
                    w += seg
                    i += seg
        if streaming:
            numba_stores.fence()
        return total, positional

    return move_rows


kernel = LazyKernel(_define, "the CPU pack")


def _signed(value: int) -> int:
    value = int(value)
    return value - (1 << 64) if value >= 1 << 63 else value


def _run(pool_words: torch.Tensor, buf_words: torch.Tensor, ids: torch.Tensor, to_buf: bool
         ) -> torch.Tensor:
    streaming = not to_buf and buf_words.numel() * 8 >= STREAMING_MIN_BYTES
    total, positional = kernel()(pool_words.numpy(), buf_words.numpy(), ids.numpy(), to_buf,
                                 BLOCK_WORDS, streaming)
    return torch.tensor([_signed(total), _signed(positional)], dtype=torch.int64)


def pack_summed(pool_words: torch.Tensor, buf_words: torch.Tensor, ids: torch.Tensor
                ) -> torch.Tensor:
    """Gather pool rows `ids` into the buffer; its sums as int64 [2] (see the module doc)."""
    return _run(pool_words, buf_words, ids, True)


def unpack_summed(pool_words: torch.Tensor, buf_words: torch.Tensor, ids: torch.Tensor
                  ) -> torch.Tensor:
    """Scatter the buffer's rows into pool rows `ids`; the buffer's sums as int64 [2]."""
    return _run(pool_words, buf_words, ids, False)
