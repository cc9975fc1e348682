"""The tcp rows of bench/transfer.py alone, and A/B runs of settings against them.

    python -m bench._transfer_tcp                  # 16/64/256 MiB, 16- and 1-token pages, 3 rounds
    python -m bench._transfer_tcp --sizes 64 --rounds 2 --variant 'seg 1M|UCX_TCP_RX_SEG_SIZE=1M|'
        --variant 'window 64M||--set send_window_bytes=67108864'

Each round measures, one after the other, pdmesh (pages in one run, then scattered), bare ucxx
and pdmesh's link (contiguous, then cut into 64 messages), so load that comes and goes hits all
of them; the table gives medians over rounds and the ratio to bare ucxx of the same rounds. A
`--variant NAME|ENV=V,ENV=V|loopback flags` adds a pdmesh row (16-token pages, pages in one run)
with those settings, each in its own pair of processes, in every round. Run it under the
benchmark lock (`flock /tmp/pdmesh-bench.lock`).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from bench import transfer as bench
from bench._transfer_report import Row, markdown

MiB = 1 << 20


def _variant(text: str) -> tuple[str, dict, list[str]]:
    name, envs, flags = (text.split("|") + ["", ""])[:3]
    extra = dict(item.split("=", 1) for item in envs.split(",") if item)
    return name, extra, flags.split()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._transfer_tcp")
    parser.add_argument("--sizes", default="16,64,256", help="request sizes, MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", default="16,1", help="page sizes, tokens")
    parser.add_argument("--variant", action="append", default=[], type=_variant)
    args = parser.parse_args(argv)
    sizes = [int(s) * MiB for s in args.sizes.split(",")]
    tokens = tuple(int(t) for t in args.tokens.split(","))
    iters = {s: max(4, min(20, (320 * MiB) // s)) for s in sizes}
    env = bench._env("tcp")
    samples: dict[str, list] = {}

    def add(name: str, value) -> None:
        samples.setdefault(name, []).append(value)

    for i in range(args.rounds):
        print(f"   tcp: round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
        cpu: dict = {}
        add("runs", bench.pdmesh_goodput(env, sizes, iters, page_tokens=tokens, cpu=cpu))
        add("cpu", cpu)
        add("scattered", bench.pdmesh_goodput(env, sizes, iters, page_tokens=tokens,
                                              scattered=True))
        add("bare", bench.bare_goodput(env, sizes, max(iters.values())))
        add("link", bench.bare_goodput(env, sizes, max(iters.values()), mode="engine"))
        add("split", bench.bare_goodput(env, sizes, max(iters.values()), mode="engine",
                                        split=bench.SPLIT))
        for name, extra, flags in args.variant:
            print(f"   variant {name}", file=sys.stderr, flush=True)
            add(name, bench.pdmesh_goodput(bench._env("tcp", extra), sizes, iters, flags,
                                           page_tokens=(16,)))
    med = lambda name, key: statistics.median(s[key] for s in samples[name])  # noqa: E731
    rows = []
    for t in tokens:
        for size in sizes:
            key = (t, size)
            rows.append(Row("tcp", t, bench._pages(t, size) * bench.PAGE_BYTES[t],
                            med("runs", key), med("scattered", key), med("bare", size),
                            med("link", size), med("split", size), None,
                            bench.NIXL.get(("tcp", t)) if size == 64 * MiB else None,
                            tuple(statistics.median(c[key][k] for c in samples["cpu"])
                                  for k in (0, 1))))
    print(markdown(rows, None, plot=False))
    if args.variant:
        print("\n| variant (16-token pages, one run) | MiB | GB/s | / bare ucxx | / defaults |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, _, _ in args.variant:
            for size in sizes:
                got = med(name, (16, size))
                print(f"| {name} | {size // MiB} | {got:.2f} | {got / med('bare', size):.2f} | "
                      f"{got / med('runs', (16, size)):.2f} |")
    print("\nper round (runs 16-token / bare, GB/s):", [
        " ".join(f"{s[(16, z)] if (16, z) in s else 0:.2f}/{b[z]:.2f}" for z in sizes)
        for s, b in zip(samples["runs"], samples["bare"])] if 16 in tokens else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
