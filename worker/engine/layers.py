"""The building blocks of the decoder, written to match Hugging Face's Llama numerics.

RMSNorm runs in float32 at least (float64 stays float64); rotary cos/sin are computed in float32
and cast to the model dtype, exactly as transformers does, so checkpoints see the same positions.

Paged KV: a layer's slice `kv[layer]` ([2, num_pages, page_size, H, D], contiguous) is viewed as
[2, num_pages * page_size, H, D]; token position p of a sequence with page table `pages` lives in
flat slot `pages[p // page_size] * page_size + p % page_size`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pdmesh.worker.engine.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden]; weight: [hidden]."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], float32, with linear or Llama 3.1 scaling applied."""
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        inv_freq = _llama3_scaling(cfg, inv_freq)
    return inv_freq.to(device)


def _llama3_scaling(cfg: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    factor, old = cfg.rope_factor, cfg.rope_original_max_positions
    low_wavelen = old / cfg.rope_low_freq_factor
    high_wavelen = old / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] int64 -> cos, sin: [T, head_dim] in `dtype`."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, b_gate_up: torch.Tensor | None,
           w_down: torch.Tensor, b_down: torch.Tensor | None) -> torch.Tensor:
    """x: [T, hidden]; w_gate_up: [2 * inter, hidden] (gate rows then up rows); w_down: [hidden, inter]."""
    gate, up = F.linear(x, w_gate_up, b_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down, b_down)


def write_kv(kv: torch.Tensor, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store k, v [T, H, D] at flat `slots` [T] of `kv[layer]`."""
    flat = kv[layer].flatten(1, 2)  # [2, pages * page_size, H, D], a view
    flat[0].index_copy_(0, slots, k)
    flat[1].index_copy_(0, slots, v)


def read_kv(kv: torch.Tensor, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [L, H, D] at flat `slots` [L] of `kv[layer]` (a gather through the page table)."""
    flat = kv[layer].flatten(1, 2)
    return flat[0].index_select(0, slots), flat[1].index_select(0, slots)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [L, Hkv, D] -> [T, Hq * D]. Grouped-query: query head h reads kv
    head h // (Hq / Hkv). `causal` masks key j > query i (prompt attention, T == L)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], is_causal=causal,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)
