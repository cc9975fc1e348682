"""The engine on a CUDA device: the same weights and answers as on the CPU, and the batch
invariance that end-to-end tests rely on. Skipped where no CUDA device exists."""

from __future__ import annotations

import pytest
import torch

from pdmesh.worker.engine import DecodeItem, colocated_generate, random_engine

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["Hello, world!", "Prefill and decode, disaggregated.", "a" * 40]


@pytest.fixture(scope="module")
def engines():
    return random_engine(), random_engine(device="cuda")


def test_cuda_engine_matches_the_cpu_engine(engines):
    cpu, gpu = engines
    assert torch.equal(cpu.model.weights.embed, gpu.model.weights.embed.cpu())
    ids = cpu.tokenizer.encode(PROMPTS[1])
    ref = colocated_generate(cpu, ids, 16, stop_on_eos=False)
    full = ids + list(ref.output_ids[:-1])
    kv = gpu.new_kv_pool(gpu.layout.pages_for_tokens(len(full)) + 2)
    pages = list(range(kv.shape[2]))[::-1]
    logits = [gpu.prefill_logits(ids, kv, pages)[-1:]]
    for t in range(len(ids), len(full)):
        logits.append(gpu.decode_logits(kv, [DecodeItem(full[t], t, pages)]))
    logits = torch.cat(logits).cpu()
    kv_cpu = cpu.new_kv_pool(kv.shape[2])
    cpu.prefill(full, kv_cpu, pages)
    dense = cpu.prefill_logits(full, kv_cpu, pages)[len(ids) - 1:]
    # Rotary cos/sin are computed in float32 (as transformers does), and CUDA's float32 cos/sin
    # can differ from the CPU's in the last bit: ~1e-7 relative, not float64's 1e-15.
    torch.testing.assert_close(logits, dense, rtol=1e-6, atol=1e-6)


def test_cuda_batched_decode_is_bit_identical_to_alone(engines):
    _, gpu = engines
    kv = gpu.new_kv_pool(24)
    items = []
    for i, prompt in enumerate(PROMPTS):
        ids = gpu.tokenizer.encode(prompt)
        pages = list(range(8 * i, 8 * i + 8))
        items.append(DecodeItem(gpu.prefill(ids, kv, pages), len(ids), pages))
    batched_kv, alone_kv = kv.clone(), kv.clone()
    batched = gpu.decode_logits(batched_kv, items)
    alone = torch.cat([gpu.decode_logits(alone_kv, [item]) for item in items])
    assert torch.equal(batched, alone) and torch.equal(batched_kv, alone_kv)
