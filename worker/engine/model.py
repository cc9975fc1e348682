"""The decoder's forward passes over a paged KV pool: a whole prompt, or one token per sequence.

Both are pure functions of (weights, config, pool, inputs) and run under `torch.inference_mode`.
The prompt pass writes each layer's K/V into the pool and attends over the K/V it just computed
(causal); the decode pass writes the new token's K/V first, then gathers every earlier position of
that sequence from the pool through its page table, so what decode reads is exactly what prefill
(or a transfer) put there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pdmesh.worker.engine.config import ModelConfig
from pdmesh.worker.engine.layers import (apply_rope, attention, read_kv, rms_norm, rope_cos_sin,
                                         rope_inv_freq, swiglu, write_kv)
from pdmesh.worker.engine.weights import LayerWeights, Weights


@dataclass
class Model:
    cfg: ModelConfig
    weights: Weights
    device: torch.device

    def __post_init__(self) -> None:
        self.inv_freq = rope_inv_freq(self.cfg, self.device)

    def _qkv(self, lw: LayerWeights, h: torch.Tensor,
             positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: [T, hidden] -> q [T, Hq, D], k and v [T, Hkv, D], rotary positions applied."""
        cfg = self.cfg
        x = rms_norm(h, lw.attn_norm, cfg.rms_eps)
        qkv = F.linear(x, lw.wqkv, lw.bqkv)
        nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = qkv.split([nq, nkv, nkv], dim=-1)
        t = h.shape[0]
        q = q.reshape(t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        cos, sin = rope_cos_sin(self.inv_freq, positions, cfg.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _finish_layer(self, lw: LayerWeights, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = h + F.linear(attn, lw.wo, lw.bo)
        x = rms_norm(h, lw.mlp_norm, self.cfg.rms_eps)
        return h + swiglu(x, lw.w_gate_up, lw.b_gate_up, lw.w_down, lw.b_down)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [T, hidden] -> logits [T, vocab]."""
        return F.linear(hidden, self.weights.lm_head)

    @torch.inference_mode()
    def prefill(self, kv: torch.Tensor, token_ids: torch.Tensor, slots: torch.Tensor,
                on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """token_ids [T] at positions 0..T-1, their flat pool slots [T] -> final hidden [T, hidden].
        `on_layer(i)` runs as soon as layer i's K/V writes are issued (nothing writes them again)."""
        positions = torch.arange(token_ids.shape[0], device=self.device)
        h = self.weights.embed[token_ids]
        for layer, lw in enumerate(self.weights.layers):
            q, k, v = self._qkv(lw, h, positions)
            write_kv(kv, layer, slots, k, v)
            if on_layer is not None:
                on_layer(layer)
            h = self._finish_layer(lw, h, attention(q, k, v, causal=True))
        return rms_norm(h, self.weights.final_norm, self.cfg.rms_eps)

    @torch.inference_mode()
    def decode(self, kv: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
               write_slots: torch.Tensor, read_slots: Sequence[torch.Tensor]) -> torch.Tensor:
        """One token for each of B sequences.

        token_ids, positions, write_slots: [B]; read_slots[i]: [positions[i] + 1], the flat slots of
        sequence i's positions 0..positions[i] (its last one is write_slots[i]). -> hidden [B, hidden].
        """
        h = self.weights.embed[token_ids]
        for layer, lw in enumerate(self.weights.layers):
            q, k, v = self._qkv(lw, h, positions)
            write_kv(kv, layer, write_slots, k, v)
            rows = []
            for i, slots in enumerate(read_slots):
                keys, values = read_kv(kv, layer, slots)
                rows.append(attention(q[i:i + 1], keys, values, causal=False))
            h = self._finish_layer(lw, h, torch.cat(rows))
        return rms_norm(h, self.weights.final_norm, self.cfg.rms_eps)
