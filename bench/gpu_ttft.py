"""TTFT on the GPU (a section of `make bench-gpu`): a PD pair beside the same model's prefill alone.

The `bench-kv` model (32 layers, 8 KV heads, head dim 128, bf16, 16-token pages) on CUDA in every
process: bootstrap, two prefill instances (layer streaming on and off) and one decode, dp 1 each,
all on the one GPU, so the KV moves over the same-host path (CUDA IPC) by default. Prompts of
512 / 2048 / 8192 tokens; then the first request of a fresh mesh against its steady state. The
measuring code is bench/ttft.py's, run with `device="cuda"`.

    python -m bench.gpu_ttft [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import ttft

LENGTHS = [512, 2048, 8192]
PLOT = Path(__file__).resolve().parent.parent / "docs" / "ttft-gpu.png"
AIM_MS = 2.0


def _added_table(series: dict) -> list[str]:
    rows = ["| prompt tokens | prefill alone ms | PD no streaming ms (added) | "
            "PD streaming ms (added) | aim: added at most |",
            "| ---: | ---: | ---: | ---: | ---: |"]
    for i, n in enumerate(series["tokens"]):
        alone, off, on = (series[k][i] for k in ("colocated", "no streaming", "streaming"))
        rows.append(f"| {n} | {alone:.1f} | {off:.1f} ({off - alone:+.1f}) | "
                    f"{on:.1f} ({on - alone:+.1f}) | {AIM_MS:.0f} ms |")
    return rows


def run(quick: bool) -> str:
    lengths = LENGTHS[:2] if quick else LENGTHS
    table, series = ttft.ttft_vs_length(lengths, 5 if quick else 20, device="cuda")
    try:
        plot_line = f"![TTFT on the GPU]({ttft._plot(series, 'TTFT, bench-kv model, one GPU', PLOT)})"
    except ImportError:  # the GPU image may lack matplotlib: the table stands alone
        plot_line = "(no plot: matplotlib is not installed on the GPU machine)"
    fresh = ttft.fresh_vs_steady(1 if quick else 3, 10 if quick else 20, preset="bench-kv",
                                 tokens=512, device="cuda")
    return "\n".join([
        "#### Time to first token on the GPU", "",
        "A PD pair (bootstrap, prefill and decode dp 1, separate processes on the one GPU, KV over "
        "the same-host path) beside the same `bench-kv` model's prefill alone in the benchmark's "
        "process (its TTFT with no transfer: the colocated baseline), p50; PD without layer "
        "streaming (`PDMESH_LAYER_STREAMING=0`) and with it, requests interleaved on one decode.",
        "", *table, "", *_added_table(series), "", plot_line, "",
        "First request of a fresh GPU mesh (bench-kv, 512-token prompts) against its steady state, "
        "with the ranks' warm-up (compiles kernels, wires transports before reporting ready) and "
        "without it:", "", *fresh, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_ttft",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two lengths, fewer repeats")
    print(run(parser.parse_args(argv).quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
