"""Tables, the plot and the settings exploration of bench/transfer.py."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "docs" / "transfer-goodput.png"
MiB = 1 << 20


@dataclass
class Row:
    transport: str
    page_tokens: int
    nbytes: int
    pdmesh: float  # pages as a fresh pool hands them out (one run: in place)
    scattered: float  # pages at random ids (packed)
    bare: float
    link: float
    split: float  # the link again, the bytes cut into 64 messages like 16-token pages
    perftest: float | None
    nixl: float | None
    cpu: tuple[float, float] = (0.0, 0.0)  # pdmesh, runs: CPU ms per transfer, sender, receiver


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(rows: list[Row], explore: list[tuple[str, float, float]] | None, plot: bool) -> str:
    lines = [
        "Pool to pool across two processes, one request at a time (request, status, messages "
        "of the wire plan, trailer checked), 32 layers x K,V, 8 KV heads, head dim 128, bf16. "
        "`pdmesh, runs`: pages as a fresh pool hands them out (one run on both sides: sent "
        "from and received into the pools in place, checksummed where they lie); `scattered`: "
        "pages at random ids on both sides (packed and unpacked per chunk). GB/s = 1e9 B/s, "
        "medians. Baselines from the same script and environment: bare ucxx (one contiguous "
        "reused buffer, back to back, ucxx's async API), the same buffer through pdmesh's UCX "
        "link (its engine without pack, unpack or protocol), the same cut into 64 messages "
        "(`64 msgs`: what the wire plan of 16-token pages sends, one message per layer and K/V, "
        "16 MiB on the wire at most) and `ucx_perftest -t tag_bw -e`; NIXL's figures (issue 14, "
        "same machine) for reference. CPU: process CPU ms per transfer of `pdmesh, runs`, "
        "sender / receiver (all threads; medians).",
        "",
        "| transport | page tokens | MiB | pdmesh, runs | pdmesh, scattered | bare ucxx | "
        "pdmesh link, contiguous | link, 64 msgs | ucx_perftest | runs / bare ucxx | "
        "CPU ms (runs) | NIXL (issue) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r.transport} | {r.page_tokens} | {r.nbytes / MiB:g} | {r.pdmesh:.2f} | "
                     f"{r.scattered:.2f} | {r.bare:.2f} | {r.link:.2f} | {r.split:.2f} | "
                     f"{_f(r.perftest)} | {r.pdmesh / r.bare:.2f} | "
                     f"{r.cpu[0]:.0f} / {r.cpu[1]:.0f} | {_f(r.nixl)} |")
    if explore:
        lines += ["", "Settings explored (64 MiB requests, 16-token pages unless named; each row "
                  "its own pair of processes, the bare row of its transport measured alongside):",
                  "", "| variant | GB/s | / bare ucxx |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {gbps:.2f} | {ratio:.2f} |" for name, gbps, ratio in explore]
    if plot and rows:
        _plot(rows)
        lines += ["", f"![goodput against request size](docs/{PLOT.name})"]
    return "\n".join(lines)


def _plot(rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transports = list(dict.fromkeys(r.transport for r in rows))
    fig, axes = plt.subplots(1, len(transports), figsize=(6 * len(transports), 4.2), sharey=False)
    for ax, transport in zip(axes if len(transports) > 1 else [axes], transports):
        mine = [r for r in rows if r.transport == transport]
        for tokens, style in ((16, "o-"), (1, "s-")):
            pts = sorted((r.nbytes / MiB, r.pdmesh) for r in mine if r.page_tokens == tokens)
            ax.plot(*zip(*pts), style, label=f"pdmesh, {tokens}-token pages")
        base = sorted({(r.nbytes / MiB, r.bare) for r in mine if r.page_tokens == 1})
        ax.plot(*zip(*base), "k--", label="bare ucxx (contiguous)")
        link = sorted({(r.nbytes / MiB, r.link) for r in mine if r.page_tokens == 1})
        ax.plot(*zip(*link), "--", color="gray", label="pdmesh link, contiguous")
        perf = sorted({(r.nbytes / MiB, r.perftest) for r in mine
                       if r.page_tokens == 1 and r.perftest})
        if perf:
            ax.plot(*zip(*perf), "k:", label="ucx_perftest tag_bw")
        for r in mine:
            if r.nixl:
                ax.plot([r.nbytes / MiB], [r.nixl], "x", color="red", markersize=9,
                        label=f"NIXL (issue), {r.page_tokens}-token")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("request size (MiB)")
        ax.set_ylabel("goodput (GB/s)")
        ax.set_title(f"KV transfer over UCX, {transport}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    PLOT.parent.mkdir(exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def explore(bench, rounds: int = 2) -> list[tuple[str, float, float]]:
    """Settings that were tried, measured here at 64 MiB (see README for what was kept). Each
    round measures the bare baseline and every variant once; medians over the rounds."""
    import statistics

    size, iters = 64 * MiB, {64 * MiB: 5}
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for transport, variants in VARIANTS:
            env = bench._env(transport)
            bare = bench.bare_goodput(env, [size], 8)[size]
            samples.setdefault(f"{transport}: bare ucxx, tag, 1 in flight", []).append(bare)
            for mode, depth in (("tag", 4), ("am", 1)):
                other = bench.bare_goodput(env, [size], 8, mode=mode, depth=depth)[size]
                samples.setdefault(f"{transport}: bare ucxx, {mode}, {depth} in flight",
                                   []).append(other)
            for name, extra, flags, layers in variants:
                print(f"   explore {transport}: {name}", file=sys.stderr, flush=True)
                try:
                    got = bench.pdmesh_goodput(bench._env(transport, extra), [size], iters, flags,
                                               layers, page_tokens=(16,))[(16, size)]
                except RuntimeError as err:  # a setting UCX refuses: say so, keep going
                    print(f"   ({name}: {err})", file=sys.stderr)
                    continue
                samples.setdefault(f"{transport}: {name}", []).append(got)
    out = []
    for name, values in samples.items():
        transport = name.partition(":")[0]
        bare = statistics.median(samples[f"{transport}: bare ucxx, tag, 1 in flight"])
        out.append((name, statistics.median(values), statistics.median(values) / bare))
    return out


# what the checksum of pages sent in place costs: the same transfer with it switched off
NO_SUM = "checksum of pages in place off (experiment: what summing them costs)"
VARIANTS = [
    ("tcp", [
        ("pdmesh defaults", {}, [], None),
        ("hot polling on (PDMESH_UCX_HOT_POLL=1)", {"PDMESH_UCX_HOT_POLL": "1"}, [], None),
        ("UCX protocol v2 (UCX_PROTO_ENABLE=y)", {"UCX_PROTO_ENABLE": "y"}, [], None),
        ("one chunk per request (no pack/send overlap)", {}, [], 32),
        ("1-layer chunks (2 MiB)", {}, [], 1),
        ("4 chunks in flight each way", {}, ["--depth", "4"], None),
        ("UCX_RNDV_SCHEME=get_zcopy", {"UCX_RNDV_SCHEME": "get_zcopy"}, [], None),
        ("UCX_TCP_SNDBUF/RCVBUF=8M", {"UCX_TCP_SNDBUF": "8M", "UCX_TCP_RCVBUF": "8M"}, [], None),
        ("UCX's own tcp segments (TX 8K, RX 64K; pdmesh sets 512K)",
         {"UCX_TCP_TX_SEG_SIZE": "8K", "UCX_TCP_RX_SEG_SIZE": "64K"}, [], None),
        ("UCX_TCP_TX_SEG_SIZE/RX_SEG_SIZE=1M", {"UCX_TCP_TX_SEG_SIZE": "1M",
                                                "UCX_TCP_RX_SEG_SIZE": "1M"}, [], None),
        ("UCX_RNDV_SCHEME=put_zcopy (received in place, no bounce copy)",
         {"UCX_RNDV_SCHEME": "put_zcopy"}, [], None),
        ("nothing in place (max_direct_runs=0: all packed)", {},
         ["--set", "max_direct_runs=0"], None),
        ("send window 64 MiB (4 messages of 16 MiB)", {},
         ["--set", f"send_window_bytes={64 * MiB}"], None),
        ("send window 1 MiB (one message at a time)", {},
         ["--set", f"send_window_bytes={MiB}"], None),
        (NO_SUM, {}, ["--no-direct-checksum"], None),
    ]),
    ("shared memory", [
        ("pdmesh defaults", {}, [], None),
        ("hot polling on (PDMESH_UCX_HOT_POLL=1)", {"PDMESH_UCX_HOT_POLL": "1"}, [], None),
        ("UCX protocol v2 (UCX_PROTO_ENABLE=y)", {"UCX_PROTO_ENABLE": "y"}, [], None),
        ("4 chunks in flight each way", {}, ["--depth", "4"], None),
        ("UCX_RNDV_FRAG_SIZE=host:4M", {"UCX_RNDV_FRAG_SIZE": "host:4M"}, [], None),
        ("nothing in place (max_direct_runs=0: all packed)", {},
         ["--set", "max_direct_runs=0"], None),
        ("send window 64 MiB", {}, ["--set", f"send_window_bytes={64 * MiB}"], None),
        (NO_SUM, {}, ["--no-direct-checksum"], None),
    ]),
]


def fragmentation(result: dict) -> str:
    """The table of bench/_fragmentation.py's burst: per allocator, pool size and role."""
    lines = ["", "Fragmentation under a burst (`bench/_fragmentation.py`: test_load's shape, "
             "prompts of 64-2,048 tokens, 16-token pages, decode growth; one prefill and one decode "
             "rank; the real KvPool beside the LIFO free list pdmesh had before). In place: share "
             "of the KV bytes the transfers' wire plans send and receive in place with the "
             "defaults.", "",
             "| allocator | pool pages | role | one run | runs / request | pages in runs of 1 | "
             "2-7 | 8-15 | 16+ | bytes in place |", "| --- | ---: | --- | ---: | ---: | ---: | "
             "---: | ---: | ---: | ---: |"]
    for (kind, pages), by_role in result.items():
        for role in ("prefill", "decode"):
            r, h = by_role[role], by_role[role]["pages_in_runs"]
            lines.append(f"| {kind} | {pages} | {role} | {r['one_run']:.0%} | "
                         f"{r['runs_per_request']:.2f} | {h['1']:.1%} | "
                         f"{h['2-3'] + h['4-7']:.1%} | {h['8-15']:.1%} | "
                         f"{h['16-63'] + h['64+']:.1%} | "
                         f"{by_role['in_place']:.0%} |")
    return "\n".join(lines)
