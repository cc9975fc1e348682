"""How many chunks a GPU prefill should stream a room in (investigation tool, not in make bench).

    python -m bench._gpu_stream_chunks [--repeats 12] [--lengths 512,2048,8192] [--chunks 4,1]

One mesh on the GPU (bootstrap, one decode, and one prefill per setting: layer streaming with
`PDMESH_GPU_STREAM_CHUNKS` = each of `--chunks`, and one without streaming), the `bench-kv` model,
requests interleaved over the prefills so a lent machine's drift hits them alike. Prints, per
prompt length and prefill, PD TTFT p50, the prefill rank's compute p50 and its transfer tail
after compute p50. What it decides: whether each chunk's report (an event, a loop wake-up, a
launch) costs the launch-bound engine thread more than streaming saves.
"""

from __future__ import annotations

import argparse

from bench.pd_client import PdClient, arun, percentile
from bench.ttft import _mesh, _prompt
from pdmesh.worker.engine.factory import EngineSpec, build_engine
from testkit.proc import stop_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._gpu_stream_chunks")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--chunks", default="4,1")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    layout = build_engine(EngineSpec(preset="bench-kv", device="cpu")).layout
    prefills = [(f"p-chunks-{c}", ["--dp-size", "1"], {"PDMESH_GPU_STREAM_CHUNKS": c})
                for c in args.chunks.split(",")]
    prefills.append(("p-nostream", ["--dp-size", "1"], {"PDMESH_LAYER_STREAMING": "0"}))
    boot, procs = _mesh("bench-kv", layout.pages_for_tokens(max(lengths)) + 4, prefills,
                        decode_dp=1, env={"PDMESH_DEVICE": args.device})
    names = [name for name, _, _ in prefills]

    async def measure() -> None:
        clients = {name: PdClient(procs[i].address, procs[-1].address, boot.address, name)
                   for i, name in enumerate(names)}
        print("| prompt tokens | prefill | PD TTFT ms p50 | compute ms p50 | "
              "tail after compute ms p50 |")
        print("| ---: | --- | ---: | ---: | ---: |")
        for n in lengths:
            ids = _prompt(n)
            for client in clients.values():
                await client.pair(ids)  # warm
            results = {name: [] for name in clients}
            for _ in range(args.repeats):
                for name, client in clients.items():
                    results[name].append(await client.pair(ids))
            for name, rs in results.items():
                print(f"| {n} | {name} | {percentile([r.ttft_ms for r in rs], 50):.1f} | "
                      f"{percentile([r.prefill.compute_ms for r in rs], 50):.1f} | "
                      f"{percentile([r.prefill.transfer_ms for r in rs], 50):.1f} |", flush=True)

    try:
        arun(measure())
    finally:
        stop_all([*procs, boot])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
