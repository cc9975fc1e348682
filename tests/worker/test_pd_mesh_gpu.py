"""A whole PD mesh on one GPU: real processes (bootstrap, two prefill instances, one decode) with
CUDA engines and CUDA pools, so the KV moves over the same-host path (CUDA IPC, the Triton copy)
while the prefill computes (layer streaming on; and off, on the other instance). The tokens
equal a colocated engine's on the same GPU (the `tiny` preset is float64 and batch-invariant),
for several prompt lengths and several requests in flight. Skipped where no CUDA device exists.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def mesh():
    from bench import ttft
    boot, procs = ttft._mesh("tiny", 256, [("p-stream", ["--dp-size", "1"], {}),
                                           ("p-nostream", ["--dp-size", "1"],
                                            {"PDMESH_LAYER_STREAMING": "0"})],
                             decode_dp=1, env={"PDMESH_DEVICE": "cuda"})
    try:
        yield boot, procs
    finally:
        from testkit.proc import stop_all
        stop_all([*procs, boot])


def test_pd_on_the_gpu_equals_colocated_with_and_without_layer_streaming(mesh):
    from bench.pd_client import PdClient
    from pdmesh.worker.engine import colocated_generate
    from pdmesh.worker.engine.factory import EngineSpec, build_engine

    boot, procs = mesh
    engine = build_engine(EngineSpec(preset="tiny", device="cuda"))
    prompts = [[(i * 7 + n) % 250 + 1 for i in range(n)] for n in (5, 64, 300)]
    want = [list(colocated_generate(engine, p, NEW_TOKENS, stop_on_eos=False).output_ids)
            for p in prompts]

    async def run() -> list:
        decode = procs[-1].address
        clients = [PdClient(procs[i].address, decode, boot.address, name)
                   for i, name in enumerate(("p-stream", "p-nostream"))]
        # Every prompt through both prefill instances, all six pairs in flight at once.
        return await asyncio.gather(*(c.pair(p, NEW_TOKENS) for c in clients for p in prompts))

    results = asyncio.run(run())
    got = [r.token_ids for r in results]
    assert got == want + want
    assert all(r.prefill.transfer_ms >= 0 for r in results)
