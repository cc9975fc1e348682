"""Model configuration: the dataclass, the named presets, and the reading of a HF config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from pdmesh.errors import InvalidArgument
from pdmesh.reasons import Reason
from pdmesh.worker.kv.layout import DTYPE_NAMES, KvLayout

HF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
             "float64": torch.float64}
ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (grouped-query attention when < num_heads)
    head_dim: int = 32
    intermediate_size: int = 384  # SwiGLU inner width
    vocab_size: int = 258  # byte tokenizer: 256 bytes + BOS + EOS
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3 (Llama 3.1 frequency scaling)
    rope_factor: float = 1.0  # linear and llama3
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_positions: int = 8192  # llama3
    rms_eps: float = 1e-5
    max_seq_len: int = 4096  # most tokens (prompt + output) of one sequence
    dtype: torch.dtype = torch.float64  # weights, activations and the KV pool
    page_size: int = 16  # tokens per KV page
    tie_word_embeddings: bool = False
    # Decode each sequence of a batch on its own (same shapes, same kernels as alone), so a
    # sequence's tokens and KV never depend on what it was batched with. See engine.py.
    batch_invariant: bool = True

    def __post_init__(self) -> None:
        positive = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "vocab_size", "max_seq_len", "page_size")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise _bad(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise _bad(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise _bad(f"head_dim must be even for rotary positions, got {self.head_dim}")
        if self.rope_type not in ROPE_TYPES:
            raise _bad(f"rope type {self.rope_type!r} is not supported; use one of {', '.join(ROPE_TYPES)}")
        if self.dtype not in HF_DTYPES.values():
            raise _bad(f"dtype {self.dtype} is not one of bf16, fp16, fp32, fp64")

    @property
    def layout(self) -> KvLayout:
        return KvLayout(self.num_layers, self.page_size, self.num_kv_heads, self.head_dim, self.dtype)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason=Reason.INVALID_MODEL_CONFIG)


PRESETS: dict[str, ModelConfig] = {
    # Fast on 2 CPU cores and exact: float64 and batch-invariant decode (the test engine).
    "tiny": ModelConfig(),
    # Realistic KV geometry (32 layers, 8 KV heads, head dim 128, like Llama 3 8B: 128 KiB of KV per
    # token in bf16) around a thin compute body, so CPU benchmarks of 8k prompts stay in reach.
    "bench-kv": ModelConfig(hidden_size=512, num_layers=32, num_heads=8, num_kv_heads=8,
                            head_dim=128, intermediate_size=1408, rope_theta=500000.0,
                            max_seq_len=16384, dtype=torch.bfloat16, batch_invariant=False),
    # Llama 3 8B's full shape with a byte vocabulary (about 7 B parameters: for a GPU).
    "llama3-8b-shape": ModelConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                                   head_dim=128, intermediate_size=14336, rope_theta=500000.0,
                                   max_seq_len=16384, dtype=torch.bfloat16, batch_invariant=False),
}


def parse_dtype(text: str) -> torch.dtype:
    """`bf16|fp16|fp32|fp64` or the HF spelling (`bfloat16`, ...) -> a torch dtype."""
    key = text.strip().lower()
    if key in DTYPE_NAMES:
        return DTYPE_NAMES[key]
    if key in HF_DTYPES:
        return HF_DTYPES[key]
    raise _bad(f"unknown dtype {text!r}; use bf16, fp16, fp32 or fp64")


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise _bad(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return PRESETS[name].replace(**changes)


def from_hf_config(cfg: Mapping[str, Any], *, dtype: torch.dtype | None = None,
                   page_size: int = 16, max_seq_len: int | None = None) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face Llama-family config.json (transformers 4 or 5 spelling)."""
    model_type = cfg.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _bad(f"model_type {model_type!r} is not supported; this engine loads "
                   f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", model_type == "mistral"):
        raise _bad("sliding-window attention is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise _bad(f"hidden_act {cfg['hidden_act']!r} is not supported (SwiGLU needs silu)")
    heads = int(cfg["num_attention_heads"])
    rope = dict(cfg.get("rope_parameters") or {})
    rope.update(cfg.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise _bad("partial rotary embeddings are not supported")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if dtype is None:
        name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        dtype = HF_DTYPES.get(name)
        if dtype is None:
            raise _bad(f"config.json dtype {name!r} is not one of {', '.join(HF_DTYPES)}")
    max_positions = int(cfg.get("max_position_embeddings", 4096))
    return ModelConfig(
        hidden_size=int(cfg["hidden_size"]), num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        intermediate_size=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
        rope_theta=float(theta), rope_type=rope_type, rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_positions=int(rope.get("original_max_position_embeddings", max_positions)),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_seq_len=max_seq_len or max_positions, dtype=dtype, page_size=page_size,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), batch_invariant=False)
