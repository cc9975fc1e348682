"""Which UCX settings make a CUDA tag send as fast as `ucx_perftest -m cuda` (H100, two processes).

Each variant runs the bare ucxx send of one CUDA buffer (bench/gpu_ucx.py `bare`, its own pair of
processes) and `ucx_perftest -t tag_bw -m cuda` under the same environment, at 64 MiB and 1 GiB:

    python -m bench._gpu_settings [--quick] [--out DIR]   # JSON lines on stdout, logs in DIR

Variants: pdmesh's settings (protocol v1), UCX's protocol v2 (the 1.21 default), v2 with each
rendezvous scheme, v2 without ucxx's peer-error handling (ucx_perftest has none), v2 with
polling progress, and UCX_PROTO_INFO logs of the protocol UCX picked.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench import gpu_ucx

BASE = {"UCX_TLS": "cuda_copy,cuda_ipc,tcp,sm,self", "UCX_MM_ERROR_HANDLING": "y",
        "UCX_WARN_UNUSED_ENV_VARS": "n"}
VARIANTS: dict[str, dict[str, str]] = {
    "pdmesh (v1)": {"UCX_PROTO_ENABLE": "n"},
    "v2": {"UCX_PROTO_ENABLE": "y"},
    "v1, no peer-error handling": {"UCX_PROTO_ENABLE": "n", "PDMESH_BENCH_UCX_ERRH": "0"},
    "v2, no peer-error handling": {"UCX_PROTO_ENABLE": "y", "PDMESH_BENCH_UCX_ERRH": "0"},
    "v2, rndv get_zcopy": {"UCX_PROTO_ENABLE": "y", "UCX_RNDV_SCHEME": "get_zcopy"},
    "v2, rndv put_zcopy": {"UCX_PROTO_ENABLE": "y", "UCX_RNDV_SCHEME": "put_zcopy"},
    "v1, rndv put_zcopy": {"UCX_PROTO_ENABLE": "n", "UCX_RNDV_SCHEME": "put_zcopy"},
    "v2, cuda_ipc cache off": {"UCX_PROTO_ENABLE": "y", "UCX_CUDA_IPC_CACHE": "n"},
}


def _with(env: dict[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return saved


def _restore(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run(sizes: list[int], iters: int, out: Path | None) -> list[dict]:
    rows = []
    for name, extra in VARIANTS.items():
        env = dict(BASE, **extra)
        if out is not None and name == "v2":
            env["UCX_PROTO_INFO"] = "y"
        saved = _with(env)
        try:
            log = out / f"bare-{len(rows)}.log" if out is not None else None
            try:
                bare = gpu_ucx._pair("bare", sizes, iters, log=log)
                for r in bare:
                    rows.append({"variant": name, "what": "bare ucxx", "bytes": r["bytes"],
                                 "gbps": round(r["gbps"], 1)})
            except Exception as err:  # noqa: BLE001 - a variant UCX refuses is a finding too
                rows.append({"variant": name, "what": "bare ucxx", "error": str(err)[-300:]})
            for size in sizes:
                try:
                    p = gpu_ucx.perftest(size, max(iters, 20))
                    rows.append({"variant": name, "what": "perftest", "bytes": size,
                                 "gbps": round(p["gbps"], 1)})
                except Exception as err:  # noqa: BLE001
                    rows.append({"variant": name, "what": "perftest", "error": str(err)[-300:]})
            print(json.dumps(rows[-len(sizes) * 2:]), flush=True)
        finally:
            _restore(saved)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = [64 << 20, 1 << 30]
    rows = run(sizes, 5 if args.quick else 20, args.out)
    if args.out is not None:
        (args.out / "settings.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
