"""Choosing a token from logits: greedy, or temperature / top-k / top-p with a per-position seed.

Random draws come from a CPU generator seeded by mixing (params.seed, position) with SplitMix64,
and the distribution is built in float64 on the CPU, so the choice depends only on the logits, the
params and the position: the same on a prefill rank, a decode rank and a colocated engine.
"""

from __future__ import annotations

import torch

from pdmesh.worker.engine.protocol import SamplingParams

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed for the token at sequence `position` of a request seeded `seed`."""
    return _splitmix64((seed & _MASK64) ^ _splitmix64(position)) >> 1


def sample(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """logits: [vocab] for the token that will sit at sequence `position` -> its id."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.detach().to("cpu", torch.float64) / params.temperature, dim=-1)
    probs, order = torch.sort(probs, descending=True, stable=True)
    if params.top_k:
        probs = probs[: params.top_k]
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (at least one token).
        before = torch.cumsum(probs, 0) - probs
        probs = probs[before < params.top_p]
    gen = torch.Generator().manual_seed(draw_seed(params.seed, position))
    u = torch.rand((), generator=gen, dtype=torch.float64) * probs.sum()
    index = int(torch.searchsorted(torch.cumsum(probs, 0), u, right=True).clamp(max=probs.numel() - 1))
    return int(order[index])
