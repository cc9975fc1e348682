"""`make bench` part `gpu`: Triton pack/unpack kernels, CUDA-memory UCX and same-host transfers.

On a machine with a CUDA device this measures (bench/gpu_kernels.py, bench/gpu_ucx.py) and writes
the fragment to bench/results/gpu-<device>.md (gpu-h100.md on the H100; committed), which the
README shows. Without a CUDA device it measures nothing and returns the last figures measured
there, read from bench/results/gpu-h100.md, saying so. `make bench-gpu` (bench/gpu_run.sh) is the
command a GPU run uses; it installs the wheels that `make gpu-wheels` put in .gpu/wheels.

    python -m bench.gpu [--quick] [--sweep] [--no-ucx] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KEPT = RESULTS / "gpu-h100.md"
AIMS = ("Aims: pack at least 0.9 and unpack at least 0.85 of the copy for large requests; for the "
        "512-token request at least 5x faster than torch's per-layer calls; pool-to-pool at least "
        "0.85 of the bare ucxx send.")


def _kept() -> str:
    if not KEPT.exists():
        return ("_No CUDA device on this machine and no figures measured on one yet "
                "(`make bench-gpu` on the GPU machine writes bench/results/gpu-h100.md)._\n")
    return ("_No CUDA device on this machine: measured nothing. These are the figures last "
            "measured on the GPU machine, kept in `bench/results/gpu-h100.md` "
            "(`make bench-gpu` there remeasures them)._\n\n" + KEPT.read_text())


def _device_line() -> tuple[str, str]:
    import torch
    import triton
    props = torch.cuda.get_device_properties(0)
    slug = next((s for s in ("h100", "h200", "a100", "b200") if s in props.name.lower()),
                re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-"))
    line = (f"Device: **{props.name}** ({props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
            f"triton {triton.__version__}; measured {time.strftime('%Y-%m-%d')}.")
    return slug, line


def _try(rows: list, errors: list, what: str, fn, *args) -> None:
    try:
        rows.extend(fn(*args))
    except Exception as exc:  # noqa: BLE001 - one failed variant must not hide the others
        errors.append(f"{what}: {str(exc)[-300:]}")


def _ucx_section(quick: bool, raw: dict) -> str:
    from bench import gpu_ucx
    sizes = [1 << 30, 64 << 20] if quick else [1 << 30, 256 << 20, 64 << 20, 16 << 20]
    tokens = [8192, 512]  # 1 GiB and 64 MiB of KV
    iters = 5 if quick else 20
    modes = ["blocking"] if quick else ["blocking", "polling", "thread"]
    variants = [(m, k) for m in modes for k in ((1,) if quick else (1, 4))]
    chunkings = [4] if quick else [2, 4, 8]
    bare, pipe, errors = [], [], []
    for mode, inflight in variants:
        _try(bare, errors, f"bare {mode} x{inflight}", gpu_ucx.bare_send, sizes, iters, mode, inflight)
    for mode in modes:
        _try(pipe, errors, f"pipe {mode}", gpu_ucx.pipe_send, tokens, iters, mode)
    for chunks in chunkings:
        _try(pipe, errors, f"chunk x{chunks}", gpu_ucx.chunk_send, tokens, iters, "blocking", chunks)
    from bench import gpu_engine
    engine = []
    for per_chunk in ([0] if quick else [0, 8, 32]):
        _try(engine, errors, f"worker/transfer x{per_chunk}", gpu_engine.run, tokens, iters, per_chunk)
    # pages as a fresh pool hands them out (one run): what a rank sees; the default chunking
    _try(engine, errors, "worker/transfer one-run", gpu_engine.run, tokens, iters, 0, "blocking",
         300, "one-run")
    perf = {}
    for n in sizes:
        try:
            perf[n] = gpu_ucx.perftest(n, iters * 5)
        except Exception as exc:  # noqa: BLE001 - reported in the table, not fatal
            perf[n] = {"error": str(exc)[-300:]}
    raw["ucx"] = {"bare": bare, "pipe": pipe, "engine": engine, "perftest": perf, "errors": errors,
                  "env": gpu_ucx.UCX_ENV}
    ref = {(r["mode"], r["bytes"]): r["gbps"] for r in bare if r["inflight"] == 1}
    head = " | ".join(f"{n / 2**20:.0f} MiB" for n in sizes)
    lines = [f"| GB/s (two processes, one GPU) | {head} |", "| --- |" + " ---: |" * len(sizes)]

    def row(label, got, mode=None):
        cells = []
        for n in sizes:
            if n not in got:
                cells.append("-")
            elif mode and (mode, n) in ref:
                cells.append(f"{got[n]:.0f} ({got[n] / ref[(mode, n)]:.2f}x bare)")
            else:
                cells.append(f"{got[n]:.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for mode, inflight in variants:
        row(f"bare ucxx send of one CUDA buffer, {mode}, {inflight} in flight",
            {r["bytes"]: r["gbps"] for r in bare if (r["mode"], r["inflight"]) == (mode, inflight)})
    row("`ucx_perftest -t tag_bw -m cuda`", {n: p["gbps"] for n, p in perf.items() if "gbps" in p})
    for mode in modes:
        row(f"pool to pool, serial: pack, sync, send, recv, unpack; {mode}",
            {r["bytes"]: r["gbps"] for r in pipe if (r["role"], r["mode"]) == ("pipe", mode)}, mode)
    for chunks in chunkings:
        row(f"pool to pool in {chunks} layer chunks, pack/send/unpack overlapped; blocking",
            {r["bytes"]: r["gbps"] for r in pipe
             if (r["role"], r["inflight"]) == ("chunk", chunks)}, "blocking")
    for per_chunk, pages in sorted({(r["layers_per_chunk"], r.get("pages", "scattered"))
                                    for r in engine}):
        got = [r for r in engine
               if (r["layers_per_chunk"], r.get("pages", "scattered")) == (per_chunk, pages)]
        row(f"pool to pool through worker/transfer (KvSender/KvReceiver, checksums, trailer), "
            f"{per_chunk} layers a chunk, pages {pages}; blocking",
            {r["bytes"]: r["gbps"] for r in got}, "blocking")
    best = max((r["gbps"] for r in engine if r["bytes"] == 1 << 30), default=None)
    if best and "gbps" in perf.get(1 << 30, {}):
        lines.append(f"| pool to pool / `ucx_perftest -m cuda` at 1 GiB (aim 0.7) | "
                     f"{best / perf[1 << 30]['gbps']:.2f} |" + " - |" * (len(sizes) - 1))
    env = " ".join(f"{k}={v}" for k, v in gpu_ucx.UCX_ENV.items() if k != "UCXPY_PROGRESS_MODE")
    note = ("" if not errors else "\n\nFailed: " + "; ".join(errors))
    return ("#### CUDA memory over UCX\n\n" + "\n".join(lines) + "\n\n"
            f"Settings: `{env}`, `UCXPY_PROGRESS_MODE` as named. GB/s: payload bytes per second "
            "(1e9), sizes in the order measured on one connection; pool to pool moves a request "
            "of 8192 tokens (1 GiB of KV) or 512 tokens (64 MiB) with the Triton kernels, ratio "
            "to the bare send of the same bytes; every run checks the bytes that arrived." + note
            + "\n")


def measure(quick: bool = False, sweep: bool = False, ucx: bool = True,
            raw: dict | None = None) -> str:
    from bench import gpu_kernels
    raw = {} if raw is None else raw
    slug, device = _device_line()
    raw["device"] = device
    rep = 20 if quick else 200
    rows = [gpu_kernels.measure_case(t, p, rep) for t, p in
            (gpu_kernels.QUICK_CASES if quick else gpu_kernels.FULL_CASES)]
    raw["kernels"] = rows
    m = gpu_kernels.MODEL
    parts = [device, "",
             f"#### Pack and unpack kernels\n\nOne request, every layer: {m['layers']} layers, K and V, "
             f"{m['heads']} KV heads, head dim {m['head_dim']}, bf16, random page ids from a pool "
             f"twice the request. TB/s count bytes read plus written (2x staging); medians of "
             f"`triton.testing.do_bench` (L2 flushed). Torch: one `index_select` / `index_copy_` "
             f"per layer and per K/V ({2 * m['layers']} calls). The kernels are checked bit for bit "
             f"against torch before timing.\n",
             gpu_kernels.kernel_table(rows), ""]
    api = gpu_kernels.api_table(rows)
    if api:
        parts += ["The public API (`pdmesh.worker.kv.pack.pack/unpack`: validation, then the same "
                  "kernel) beside the bare launch:\n", api, ""]
    if sweep:
        srows = gpu_kernels.sweep(rep // 2)
        raw["sweep"] = srows
        parts += ["Tile sweep (pack_triton's `tile_bytes`, `num_warps`):\n",
                  gpu_kernels.sweep_table(srows), ""]
    if ucx:
        try:
            parts.append(_ucx_section(quick, raw))
        except Exception as exc:  # noqa: BLE001 - the kernel figures still stand
            raw["ucx_error"] = traceback.format_exc()
            parts.append(f"#### CUDA memory over UCX\n\nNot measured: {exc}\n")
    try:  # issue 13: the same-host path (CUDA IPC, a Triton copy per chunk)
        from bench import gpu_samehost
        parts.append(gpu_samehost.run(quick))
    except Exception as exc:  # noqa: BLE001 - the other figures still stand
        raw["samehost_error"] = traceback.format_exc()
        parts.append(f"#### Same host\n\nNot measured: {exc}\n")
    try:  # issue 13: TTFT of a PD pair on the GPU beside the prefill alone
        from bench import gpu_ttft
        parts.append(gpu_ttft.run(quick))
    except Exception as exc:  # noqa: BLE001 - the other figures still stand
        raw["ttft_error"] = traceback.format_exc()
        parts.append(f"#### Time to first token on the GPU\n\nNot measured: {exc}\n")
    parts.append(AIMS)
    fragment = "\n".join(parts) + "\n"
    if not quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"gpu-{slug}.md").write_text(fragment)
    return fragment


def run(args) -> str:
    """The bench part: measure where CUDA is, else return the last figures measured there."""
    import torch
    if not torch.cuda.is_available():
        return _kept()
    return measure(quick=getattr(args, "quick", False), sweep=getattr(args, "sweep", False),
                   ucx=not getattr(args, "no_ucx", False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    parser.add_argument("--sweep", action="store_true", help="also sweep the kernel tile sizes")
    parser.add_argument("--no-ucx", action="store_true", help="kernels only")
    parser.add_argument("--json", type=Path, help="write every raw figure here")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(int(os.environ.get("PDMESH_TORCH_THREADS", "1")))
    if not torch.cuda.is_available():
        print(_kept())
        return 0
    raw: dict = {}
    try:
        print(measure(args.quick, args.sweep, not args.no_ucx, raw))
    finally:
        if args.json:
            args.json.write_text(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
