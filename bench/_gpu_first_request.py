"""What the first request of a fresh GPU mesh still pays after the ranks' warm-up (an investigation
tool, not in `make bench`).

    python -m bench._gpu_first_request [--tokens 512] [--steady 5]

`bench.gpu_ttft` found the first 512-token request of a warmed fresh mesh at 3.3x its steady TTFT,
the prefill rank's compute 133 against 38 ms. For each variant (default; layer streaming off;
same-host path off; CUDA loading every kernel at start-up, not on first use) this starts a fresh
mesh (bootstrap, prefill and decode dp 1, bench-kv, CUDA) with its own empty Triton cache,
sends one request, then `--steady` more, and prints TTFT and the prefill's compute / transfer ms
of each, the Triton kernels compiled before the first request
(the warm-up's) and by it (any is a compilation on the request path), and the ranks' log lines
about warm-up and compute.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench.pd_client import PdClient, arun
from bench.ttft import _mesh, _prompt
from pdmesh.worker.engine.factory import EngineSpec, build_engine
from testkit.proc import stop_all

VARIANTS = (("default", {}), ("no streaming", {"PDMESH_LAYER_STREAMING": "0"}),
            ("path ucx", {"PDMESH_KV_TRANSFER_PATH": "ucx"}),
            ("eager modules", {"CUDA_MODULE_LOADING": "EAGER"}))


def _kernels(cache: Path) -> set[str]:
    """Compiled kernels in a Triton cache: one folder per kernel and specialization."""
    return {str(p.relative_to(cache)) for p in cache.rglob("*.json")
            if not p.name.startswith("__grp__")}


def one(label: str, extra: dict, tokens: int, steady: int, device: str) -> None:
    cache = Path(tempfile.mkdtemp(prefix="triton-cache-"))
    env = {"PDMESH_DEVICE": device, "TRITON_CACHE_DIR": str(cache), **extra}
    layout = build_engine(EngineSpec(preset="bench-kv")).layout
    boot, procs = _mesh("bench-kv", layout.pages_for_tokens(tokens) + 4,
                        [("p-first", ["--dp-size", "1"], {})], decode_dp=1, env=env)
    ids = _prompt(tokens)
    try:
        before = _kernels(cache)

        async def measure() -> list:
            client = PdClient(procs[0].address, procs[1].address, boot.address, "p-first")
            return [await client.pair(ids) for _ in range(1 + steady)]
        results = arun(measure())
        after = _kernels(cache)
    finally:
        stop_all([*procs, boot])
    print(f"## {label}: kernels compiled by the warm-up {len(before)}, by the first request "
          f"{sorted(after - before)}")
    for i, r in enumerate(results):
        print(f"  request {i}: TTFT {r.ttft_ms:.1f} ms, compute {r.prefill.compute_ms:.1f}, "
              f"transfer after compute {r.prefill.transfer_ms:.1f}")
    for proc in procs:
        for line in Path(proc.log_path).read_text().splitlines():
            if any(k in line for k in ("warmed up", "prefill done", "linked", "same-host",
                                       "mapped")):
                print(f"  [{proc.name}] {line[:300]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._gpu_first_request")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steady", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    args = parser.parse_args(argv)
    wanted = args.variants.split(",")
    for label, extra in VARIANTS:
        if label in wanted:
            one(label, extra, args.tokens, args.steady, args.device)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PDMESH_TORCH_THREADS", "1")
    sys.exit(main())
