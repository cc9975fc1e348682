"""The CPU same-host page copy as one compiled loop: each word is read once, stored, and added to
its row's sum while it is in a register (numba; the torch version in page_copy.py is the
reference and the fallback where numba cannot be imported).

    value = copy_pages_numba(src_kv, dst_kv, src_ids, dst_ids, order, a, b)   # layers [a, b)

Why a compiled loop: torch has no fused copy-and-reduce, so the torch version makes one `copy_`
and one `sum` per run of pages (per page at scattered ids: 512 of each for 64 MiB of 1-token
pages) and reads every byte twice; its checksum cost 19-38% of the copy here, and the op
overhead dominated small pages. This loop is memory bound like a plain copy: on this machine it
runs as fast as a contiguous `copy_` of the same bytes, its row sums cost a few percent, and it
releases the GIL for the whole chunk (the event loop runs meanwhile).

The checksum is page_copy.py's: rows r = (layer * 2 + kv) * n + j, value = sum of rowsum(r) *
(2 r + 1) mod 2^64, rowsum adding the row's words (page_copy.word_dtype) as signed integers, so
it matches `checksum_pages` bit for bit and chunks add up. Compiled once per word dtype on first
use (about 0.5 s; `warm` does it at a rank's warm-up) and cached next to this file where it is
writable.

Large copies store with non-temporal stores (`streaming`): a normal store first reads the
destination line into the cache, so a copy moves three bytes over the memory bus for every two it
copies; a streaming store writes the line straight to memory. Measured here (64 MiB, 16-token
pages at scattered ids, checksum taken): one thread 6.6-8.9 -> 9.3-9.7 GB/s, two threads 11.2-13.0
-> 12.1-17.0 GB/s. Small copies keep normal stores: their destination is read again soon (a decode
step) and may still be in the cache.
Where every destination row starts on a cache line (rows of whole lines in a 64-byte aligned
pool: every KV layout in practice), the streaming copy moves a line per store on flat offsets
(numba_stores.copy_row_lines: one vector streaming store per line, no array view per row) and
takes the pages in the order of their source ids; one thread, 64 MiB at scattered ids (A/B,
alternating processes): 16-token pages 6.4-7.3 -> 5.1-7.8 ms, 1-token pages 12.6-15.8 -> 8.0-10.6
ms; 1 GiB of 1-token pages 218-235 -> 129-167 ms.
"""

from __future__ import annotations

import torch

from pdmesh.worker.kv.numba_kernel import LazyKernel


def _define():
    import numpy as np

    from pdmesh.worker.kv import numba_stores

    def copy_rows(src, dst, src_ids, dst_ids, order, a, b, checksum, streaming):
        """src [layers, 2, pages, words], dst [layers, 2, pages', words]: copy rows (l, kv,
        src_ids[j]) -> (l, kv, dst_ids[j]) for l in [a, b), j taken in the order `order` (its
        source pages ascending: reads walk the pool forward; the checksum does not depend on
        it); the weighted row-sum checksum. `streaming`: non-temporal stores (large copies: no
        read of the destination line first, no cache displaced), fenced before returning, a
        whole cache line per store where every destination row starts on a line."""
        n, pages, dst_pages, words = src_ids.shape[0], src.shape[2], dst.shape[2], src.shape[3]
        lines = streaming and numba_stores.lines_fit(dst, words)
        flat_src, flat_dst = src.reshape(src.size), dst.reshape(dst.size)
        total = np.uint64(0)
        for layer in range(a, b):
            for kv in range(2):
                row = layer * 2 + kv
                weight = np.uint64(2 * row * n + 1)
                for k in range(n):
                    j = order[k]
                    if lines:  # flat offsets: no array view per row (~90 ns each)
                        acc = numba_stores.copy_row_lines(
                            flat_src, (row * pages + src_ids[j]) * words,
                            flat_dst, (row * dst_pages + dst_ids[j]) * words, words)
                    elif checksum or streaming:
                        acc = numba_stores.copy_summed(src[layer, kv, src_ids[j]],
                                                       dst[layer, kv, dst_ids[j]], streaming)
                    else:  # the bench's copy-alone baseline
                        s, d = src[layer, kv, src_ids[j]], dst[layer, kv, dst_ids[j]]
                        for w in range(words):
                            d[w] = s[w]
                        acc = np.uint64(0)
                    total += acc * (weight + np.uint64(2 * j))
        if streaming:
            numba_stores.fence()
        return total if checksum else np.uint64(0)

    return copy_rows


kernel = LazyKernel(_define, "the CPU page copy")


def copy_pages_numba(src_words: torch.Tensor, dst_words: torch.Tensor, src_ids: torch.Tensor,
                     dst_ids: torch.Tensor, order: torch.Tensor, a: int, b: int,
                     checksum: bool = True, streaming: bool = False) -> int:
    """Copy rows of pages `src_ids` -> `dst_ids` of layers [a, b) between two pools viewed as
    [layers, 2, pages, words] of one integer dtype (page_copy._words); the checksum (0 when
    `checksum` is off: the bench's copy-only baseline). `streaming`: non-temporal stores, for
    copies far larger than the cache (the same-host writer's threaded slices). `order`: the
    order to copy the pages in (CopyPlan.order: by source page). The caller validated shapes
    and ids."""
    run = kernel()
    value = run(src_words.numpy(), dst_words.numpy(), src_ids.numpy(), dst_ids.numpy(),
                order.numpy(), a, b, checksum, streaming)
    return int(value)


def warm(words: torch.Tensor) -> None:
    """Compile for this word dtype now (a rank's warm-up), on one page of `words` onto itself."""
    if kernel() is None or words.shape[2] == 0:
        return
    one = torch.zeros(1, dtype=torch.int64)
    copy_pages_numba(words, words, one, one, one, 0, 0)  # one signature: the flags are arguments
