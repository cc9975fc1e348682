"""Same-host KV transfer on CPU (issue 13): pool to pool beside a contiguous copy and UCX.

For 16/64/256 MiB requests of 16-, 1- and 64-token pages (32 layers x K,V, 8 KV heads, head dim
128, bf16, pages at scattered ids on both sides), in one script:
- same host: a loopback sender and receiver pair (`PDMESH_KV_TRANSFER_PATH=auto`; the receiver's
  pool in shared memory), one request at a time: request, status, the sender's copy straight
  into the receiver's pages (checksum in the same pass), trailer checked. Median fetch time.
- UCX over shared memory: the same pair with `PDMESH_KV_TRANSFER_PATH=ucx`.
- the physical limit: a single-threaded contiguous `copy_` of the same bytes in this process
  (buffers touched first), median.
- the checksum's share (issue 13, item 4): the same copy with and without its fused row sums,
  in this process, and the UCX path's separate checksum pass (`wire.checksum` of a chunk) beside
  that chunk's pack.

    python -m bench._transfer_samehost [--quick]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

MiB = 1 << 20
# NIXL's shared-memory figures from issue 13 (same machine), GB/s, and the aims.
NIXL = {16: (3.6, 4.9), 1: (0.85, 0.88)}
AIM = {16: "0.7x copy and 2x NIXL", 1: "4x NIXL"}


def _median_time(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def contiguous_copy(nbytes: int, iters: int) -> float:
    """GB/s of one thread copying `nbytes` from one touched buffer into another."""
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src).random_()
    return nbytes / _median_time(lambda: dst.copy_(src), iters) / 1e9


def checksum_share(page_tokens: int, nbytes: int, iters: int) -> dict[str, float]:
    """The fused checksum's cost in the same-host copy, and the UCX path's checksum pass."""
    from pdmesh.worker.kv import page_copy
    from pdmesh.worker.kv.pack import pack_checked
    from pdmesh.worker.transfer import wire

    shape = lambda pages: (32, 2, pages, page_tokens, 8, 128)  # noqa: E731
    n = max(1, nbytes // (32 * 2 * page_tokens * 8 * 128 * 2))
    src = torch.empty(shape(2 * n + 8), dtype=torch.bfloat16).view(torch.int16).random_()
    dst = torch.empty(shape(2 * n + 8), dtype=torch.bfloat16).view(torch.int16).random_()
    src, dst = src.view(torch.bfloat16), dst.view(torch.bfloat16)
    rng = random.Random(n)
    plan = page_copy.CopyPlan(torch.tensor(rng.sample(range(2 * n + 8), n)),
                              torch.tensor(rng.sample(range(2 * n + 8), n)))
    words_src, words_dst = page_copy._words(src), page_copy._words(dst)

    def copy_only():
        for _, s0, d0, k in plan.runs:
            words_dst[:, :, d0:d0 + k].copy_(words_src[:, :, s0:s0 + k])

    with_sum = _median_time(lambda: page_copy.copy_pages(src, dst, plan, 0, 32), iters)
    without = _median_time(copy_only, iters)
    layers = 4  # the UCX path's default chunk here: 8 MiB of 16-token pages
    buf = torch.empty((layers, 2, n) + tuple(src.shape[3:]), dtype=src.dtype)
    pack = _median_time(lambda: pack_checked(src, plan.src_ids, 0, layers, buf), iters)
    check = _median_time(lambda: wire.checksum(buf.view(torch.uint8).view(-1)), iters)
    return {"fused": (with_sum - without) / with_sum, "ucx_pass": check / (pack + check)}


def run(quick: bool) -> str:
    from bench import transfer as bench

    sizes = [64 * MiB] if quick else [16 * MiB, 64 * MiB, 256 * MiB]
    tokens = (16, 1) if quick else (16, 1, 64)
    iters = {s: (3 if quick else max(4, min(12, (320 * MiB) // s))) for s in sizes}
    same = bench.pdmesh_goodput(bench._env("same host"), sizes, iters, page_tokens=tokens)
    ucx = bench.pdmesh_goodput(bench._env("shared memory"), sizes, iters, page_tokens=tokens)
    copy = {s: contiguous_copy(s, 2 * iters[s] + 3) for s in sizes}
    shares = {t: checksum_share(t, 64 * MiB, 5) for t in tokens}
    lines = [
        "Same host on CPU: pool to pool across two processes, one request at a time, the sender "
        "writing straight into the receiver's pool (shared memory), checksum fused into the copy, "
        "trailer checked; beside a single-threaded contiguous copy of the same bytes and the UCX "
        "path over shared memory, all measured by this script (`bench/_transfer_samehost.py`). "
        "32 layers x K,V, 8 KV heads, head dim 128, bf16, scattered page ids. GB/s = 1e9 B/s, "
        "medians.", "",
        "| page tokens | MiB | same host | contiguous copy | same host / copy | UCX (shared "
        "memory) | same host / UCX | NIXL (issue) | same host / NIXL | aim |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for t in tokens:
        for s in sizes:
            got = same[(t, s)]
            nixl = NIXL.get(t) if s == 64 * MiB else None
            nixl_cell = f"{nixl[0]:.2f}-{nixl[1]:.2f}" if nixl else "-"
            ratio = f"{got / nixl[1]:.1f}-{got / nixl[0]:.1f}x" if nixl else "-"
            aim = AIM.get(t, "-") if s == 64 * MiB else "-"
            lines.append(f"| {t} | {s // MiB} | {got:.2f} | {copy[s]:.2f} | {got / copy[s]:.2f} | "
                         f"{ucx[(t, s)]:.2f} | {got / ucx[(t, s)]:.1f}x | {nixl_cell} | {ratio} | "
                         f"{aim} |")
    lines += ["", "The checksum's cost (64 MiB, in this process): the same-host copy with its row "
              "sums fused against the same copy without them, and the UCX path's separate "
              "checksum pass over an 8 MiB chunk against that chunk's pack plus checksum.", "",
              "| page tokens | fused checksum, share of the same-host copy | UCX path: checksum "
              "pass, share of pack + checksum |", "| ---: | ---: | ---: |"]
    for t in tokens:
        lines.append(f"| {t} | {100 * shares[t]['fused']:.1f}% | {100 * shares[t]['ucx_pass']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._transfer_samehost",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB, 16- and 1-token pages only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(run(args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
