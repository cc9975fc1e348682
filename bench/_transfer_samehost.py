"""Same-host KV transfer on CPU (issue 13): pool to pool beside a contiguous copy and UCX.

For 16/64/256 MiB requests of 16-, 1- and 64-token pages (32 layers x K,V, 8 KV heads, head dim
128, bf16), in one script:
- same host: a loopback sender and receiver pair (`PDMESH_KV_TRANSFER_PATH=auto`; the receiver's
  pool in shared memory), one request at a time: request, status, the sender's copy straight
  into the receiver's pages (checksum in the same pass), trailer checked. Median fetch time,
  and the CPU time both processes spent on it. Pages at scattered ids on both sides (one row per
  page: the hard case the aims are set for), and once with pages as the allocator hands them out
  (runs) for 16-token pages at 64 MiB.
- the physical limit: a single-threaded contiguous `copy_` of the same bytes in this process
  (buffers touched first), timed right after each transfer, so a burst of load on this shared
  machine hits both alike; the ratio is the median of the per-pair ratios.
- UCX over shared memory: the same pair with `PDMESH_KV_TRANSFER_PATH=ucx`, scattered ids.
- the checksum's share (issue 13, item 4): the same-host copy (page_copy.copy_pages, scattered
  ids, 64 MiB) with and without its row sums, in this process, against the copy alone and
  against the whole transfer measured above; the torch ops it replaced (copy_ + sum per page,
  page_copy._copy_torch) beside it; and the UCX path's pack of an 8 MiB chunk with its checksum
  fused (`digest.pack_parts`) against the torch pack without it, beside the separate checksum
  pass (`wire.checksum` of the chunk) that the fused pack replaced.

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
# NIXL's shared-memory figures from issue 13 (same machine), GB/s, and the aims, checked
# against the upper end of NIXL's range.
NIXL = {16: (3.6, 4.9), 1: (0.85, 0.88)}
AIM = {16: "0.7x copy and 2x NIXL", 1: "4x NIXL"}


def _aim_met(tokens: int, got: float, of_copy: float) -> str:
    if tokens == 16:
        return "yes" if of_copy >= 0.7 and got >= 2 * NIXL[16][1] else "no"
    if tokens == 1:
        return "yes" if got >= 4 * NIXL[1][1] else "no"
    return "-"


def _median_time(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def same_host_pairs(sizes: list[int], iters: dict[int, int], tokens: tuple, scattered: bool
                    ) -> dict[tuple[int, int], dict[str, float]]:
    """{(page tokens, size): medians} of same-host transfers, each followed by a contiguous copy
    of its bytes in this process: GB/s of both, their per-pair ratio, CPU ms per transfer."""
    from bench import transfer as bench

    pool_pages = {t: int(bench._pages(t, max(sizes)) * 1.25) + 8 for t in bench.LAYOUTS}
    base = [sys.executable, "-m", "pdmesh.worker.transfer.loopback"]
    args = ["--layout", bench.LAYOUTS[16], "--pages", str(pool_pages[16])]
    env = bench._env("same host")
    sender = bench.Proc(base + ["sender"] + args, env)
    receiver = bench.Proc(base + ["receiver"] + args, env)
    copies = {s: (torch.empty(s, dtype=torch.uint8).random_(),
                  torch.empty(s, dtype=torch.uint8).random_()) for s in sizes}
    results, room = {}, 1
    try:
        address = sender.get("event", "ready")["address"]
        receiver.get("event", "ready")
        for t in tokens:
            for size in sizes:
                pages, got = bench._pages(t, size), []
                common = {"layout": bench.LAYOUTS[t], "pool_pages": pool_pages[t],
                          "pages": pages, "scattered": scattered}
                for i in range(iters[size] + 1):
                    sender.send(op="offer", room=room, timeout=120, **common)
                    sender.get("event", "offered")
                    receiver.send(op="fetch", address=address, rooms=[room], timeout=120,
                                  **common)
                    done = receiver.get("event", "fetch_done")
                    offered = sender.get("event", "offer_done")
                    if not done["ok"] or done["path"] != "samehost":
                        raise RuntimeError(f"same-host transfer failed: {done}")
                    src, dst = copies[size]
                    start, cpu = time.perf_counter(), time.thread_time()
                    dst.copy_(src)
                    copy_s, copy_cpu = time.perf_counter() - start, time.thread_time() - cpu
                    if i:  # the first one warms the link and the mapping
                        got.append((done["seconds"], copy_s, done["cpu_s"] + offered["cpu_s"],
                                    copy_cpu))
                    room += 1
                nbytes = pages * bench.PAGE_BYTES[t]
                results[(t, size)] = {
                    "gbps": nbytes / statistics.median(g[0] for g in got) / 1e9,
                    "ms": 1e3 * statistics.median(g[0] for g in got),
                    "copy": nbytes / statistics.median(g[1] for g in got) / 1e9,
                    "ratio": statistics.median(g[1] / g[0] for g in got),
                    "cpu_ms": 1e3 * statistics.median(g[2] for g in got),
                    "cpu_ratio": statistics.median(g[3] / g[2] for g in got)}
    finally:
        sender.stop()
        receiver.stop()
    return results


def checksum_share(page_tokens: int, nbytes: int, iters: int) -> dict[str, float]:
    """Seconds of the same-host copy with and without its checksum (and of the torch ops it
    replaced), and the UCX path's checksum as a share of its pack: fused into the pack
    (`digest.pack_parts` against `pack_checked`) and as the separate pass it replaced."""
    from pdmesh.worker.kv import page_copy
    from pdmesh.worker.kv.pack import pack_checked
    from pdmesh.worker.transfer import digest, wire

    shape = lambda pages: (32, 2, pages, page_tokens, 8, 128)  # noqa: E731
    n = max(1, nbytes // (32 * 2 * page_tokens * 8 * 128 * 2))
    src = torch.empty(shape(2 * n + 8), dtype=torch.bfloat16).view(torch.int16).random_()
    dst = torch.empty(shape(2 * n + 8), dtype=torch.bfloat16).view(torch.int16).random_()
    src, dst = src.view(torch.bfloat16), dst.view(torch.bfloat16)
    rng = random.Random(n)
    plan = page_copy.CopyPlan(torch.tensor(rng.sample(range(2 * n + 8), n)),
                              torch.tensor(rng.sample(range(2 * n + 8), n)))
    fused = lambda: page_copy.copy_pages(src, dst, plan, 0, 32)  # noqa: E731
    alone = lambda: page_copy.copy_pages(src, dst, plan, 0, 32, checksum=False)  # noqa: E731
    fused(), alone()
    pairs = []
    for _ in range(3 * iters):  # alternating, so a burst of load hits both alike
        start = time.perf_counter()
        fused()
        middle = time.perf_counter()
        alone()
        pairs.append((middle - start, time.perf_counter() - middle))
    torch_ops = _median_time(lambda: page_copy._copy_torch(src, dst, plan, 0, 32), iters)
    layers = 4  # the UCX path's default chunk here: 8 MiB of 16-token pages
    buf = torch.empty((layers, 2, n) + tuple(src.shape[3:]), dtype=src.dtype)
    flat = buf.view(torch.uint8).view(-1)
    pack = _median_time(lambda: pack_checked(src, plan.src_ids, 0, layers, buf), iters)
    packed = _median_time(lambda: digest.pack_parts(src, plan.src_ids, 0, layers, flat), iters)
    check = _median_time(lambda: wire.checksum(flat), iters)
    return {"fused": statistics.median(p[0] for p in pairs),
            "alone": statistics.median(p[1] for p in pairs),
            "cost": statistics.median(p[0] - p[1] for p in pairs), "torch": torch_ops,
            "ucx_fused": (packed - pack) / packed, "ucx_pass": check / (pack + check)}


def run(quick: bool) -> str:
    """The tables. The baselines in this process run on one thread whoever calls (`make bench`
    does not set torch's threads; a `copy_` on two threads ran 14 GB/s where one ran 8-10, and
    the tables compared against that while calling it single-threaded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> str:
    from bench import transfer as bench

    sizes = [64 * MiB] if quick else [16 * MiB, 64 * MiB, 256 * MiB]
    tokens = (16, 1) if quick else (16, 1, 64)
    iters = {s: (7 if quick else max(6, min(16, (512 * MiB) // s))) for s in sizes}
    same = same_host_pairs(sizes, iters, tokens, scattered=True)
    in_runs = same_host_pairs([64 * MiB], iters, (16,), scattered=False)
    ucx = bench.pdmesh_goodput(bench._env("shared memory"), sizes,
                               {s: max(3, n // 2) for s, n in iters.items()}, page_tokens=tokens,
                               scattered=True)
    shares = {t: checksum_share(t, 64 * MiB, 5) for t in tokens}
    return _tables(sizes, tokens, same, in_runs, ucx, shares)


def _tables(sizes, tokens, same, in_runs, ucx, shares) -> str:
    lines = [
        "Same host on CPU: pool to pool across two processes, one request at a time, the sender "
        "writing straight into the receiver's pool (shared memory) in one compiled pass that "
        "also takes the checksum (`worker/kv/copy_numba.py`), trailer checked; beside a "
        "single-threaded contiguous copy of the same bytes timed right after each transfer "
        "(`same host / copy`: median of the per-pair ratios) and the UCX path over shared "
        "memory, all measured by this script (`bench/_transfer_samehost.py`). 32 layers x K,V, "
        "8 KV heads, head dim 128, bf16, pages at scattered ids on both sides (one row per page; "
        "the last row: pages in runs as the allocator hands them out). `CPU ms`: both "
        "processes' CPU time per transfer, and `CPU: copy / same host` the copy's CPU time over "
        "that (per pair, median): what a transfer costs in CPU where wall time waits for cores "
        "other sessions hold. GB/s = 1e9 B/s, medians; aims checked against the "
        "upper end of NIXL's range.", "",
        "| page tokens | MiB | same host | ms | CPU ms | contiguous copy | same host / copy | CPU: "
        "copy / same host | UCX (shared memory) | same host / UCX | NIXL (issue) | same host / "
        "NIXL | aim | met |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- "
        "| --- |"]
    rows = [(t, s, same[(t, s)], ucx[(t, s)], "") for t in tokens for s in sizes]
    rows.append((16, 64 * MiB, in_runs[(16, 64 * MiB)], None, " (runs)"))
    for t, s, got, other, note in rows:
        nixl = NIXL.get(t) if s == 64 * MiB and not note else None
        gbps = got["gbps"]
        nixl_cell = f"{nixl[0]:.2f}-{nixl[1]:.2f}" if nixl else "-"
        ratio = f"{gbps / nixl[1]:.1f}-{gbps / nixl[0]:.1f}x" if nixl else "-"
        aim, met = (AIM.get(t, "-"), _aim_met(t, gbps, got["ratio"])) if nixl else ("-", "-")
        ucx_cells = f"{other:.2f} | {gbps / other:.1f}x" if other else "- | -"
        lines.append(f"| {t}{note} | {s // MiB} | {gbps:.2f} | {got['ms']:.1f} | "
                     f"{got['cpu_ms']:.1f} | {got['copy']:.2f} | {got['ratio']:.2f} | "
                     f"{got['cpu_ratio']:.2f} | "
                     f"{ucx_cells} | {nixl_cell} | {ratio} | {aim} | {met} |")
    lines += ["", "The checksum's cost (64 MiB, scattered ids, in this process): the same-host "
              "copy with its row sums against the same compiled copy without them (alternating; "
              "the cost is the median of the per-pair differences), as a share of that copy and of the whole same-host transfer above (its median "
              "time); the torch ops the compiled loop replaced (one `copy_` and one `sum` per "
              "page); and the UCX path's pack of an 8 MiB chunk with the checksum fused into it "
              "(`digest.pack_parts`: worker/kv/pack_numba.py) against the torch pack without a "
              "checksum (`pack_checked`; negative: the fused pass is faster than the pack alone), "
              "beside the separate checksum pass it replaced (share of pack + pass).", "",
              "| page tokens | copy alone ms | copy + checksum ms | checksum / copy | checksum / "
              "transfer | torch ops ms (before) | compiled / torch | UCX pack: checksum fused | "
              "UCX pack: separate pass (before) |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in tokens:
        sh = shares[t]
        cost = sh["cost"]  # median of the per-pair differences
        transfer = same[(t, 64 * MiB)]["ms"] / 1e3
        lines.append(f"| {t} | {1e3 * sh['alone']:.2f} | {1e3 * sh['fused']:.2f} | "
                     f"{100 * cost / sh['alone']:.1f}% | {100 * cost / transfer:.1f}% | "
                     f"{1e3 * sh['torch']:.2f} | {sh['torch'] / sh['fused']:.1f}x faster | "
                     f"{100 * sh['ucx_fused']:.1f}% | {100 * sh['ucx_pass']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._transfer_samehost",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB, 16- and 1-token pages only")
    args = parser.parse_args(argv)
    print(run(args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
