"""Model weights: seeded random initialisation, and loading a Hugging Face safetensors checkpoint.

Projections are stored fused (q|k|v rows in one matrix, gate|up rows in one) so a layer makes
four matrix products. Checkpoints are read tensor by tensor with `safetensors` (single file, a
sharded `model.safetensors.index.json`, or every `*.safetensors` of the folder), cast to the
model dtype, and fused; `tie_word_embeddings` reuses the embedding as the output head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pdmesh.errors import InvalidArgument
from pdmesh.reasons import Reason
from pdmesh.worker.engine.config import ModelConfig


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [(num_heads + 2 * num_kv_heads) * head_dim, hidden]
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # [hidden, num_heads * head_dim]
    bo: torch.Tensor | None
    mlp_norm: torch.Tensor  # [hidden]
    w_gate_up: torch.Tensor  # [2 * intermediate, hidden]
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor  # [hidden, intermediate]
    b_down: torch.Tensor | None


@dataclass
class Weights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the embedding itself when tied


def random_weights(cfg: ModelConfig, seed: int = 0, device: torch.device | str = "cpu") -> Weights:
    """Seeded weights: the same (config, seed) gives the same bits in any process, on any device.

    Values are drawn on the CPU in float32 in a fixed order, then cast and moved, so a GPU engine
    holds the same weights as a CPU one and float32 and float64 versions differ only by rounding.
    Linear weights have std 1/sqrt(fan_in), embeddings std 1, norm weights 1 + N(0, 0.1^2):
    activations stay of order one in every layer.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        x = torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean
        return x.to(device=device, dtype=cfg.dtype)

    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    embed = draw(cfg.vocab_size, h, std=1.0)
    layers = []
    for _ in range(cfg.num_layers):
        layers.append(LayerWeights(
            attn_norm=draw(h, std=0.1, mean=1.0), wqkv=draw(qkv_rows, h, std=h ** -0.5), bqkv=None,
            wo=draw(h, cfg.num_heads * d, std=(cfg.num_heads * d) ** -0.5), bo=None,
            mlp_norm=draw(h, std=0.1, mean=1.0), w_gate_up=draw(2 * inter, h, std=h ** -0.5),
            b_gate_up=None, w_down=draw(h, inter, std=inter ** -0.5), b_down=None))
    final_norm = draw(h, std=0.1, mean=1.0)
    lm_head = embed if cfg.tie_word_embeddings else draw(cfg.vocab_size, h, std=h ** -0.5)
    return Weights(embed, layers, final_norm, lm_head)


def _bad_folder(message: str, **metadata: object) -> InvalidArgument:
    return InvalidArgument(message, reason=Reason.INVALID_MODEL_FOLDER, metadata=metadata)


def _damaged(path: Path, exc: Exception) -> InvalidArgument:
    return _bad_folder(f"{path} cannot be read ({exc}); it is damaged or truncated: delete the folder "
                       "if pdmesh cached it (the next start converts the model again), else replace "
                       "the file", path=path)


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
        raise _damaged(path, exc) from None


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise _bad_folder(f"no *.safetensors file in {folder}", path=folder)
    names = {}
    for path in files:
        with _open(path) as f:
            names.update({name: path for name in f.keys()})
    return names


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a Llama-family checkpoint of `cfg` must hold (biases optional, not listed)."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter)})
    return shapes


def check_hf_weights(folder: str | Path, cfg: ModelConfig) -> None:
    """Every tensor `load_hf_weights` reads is there with config.json's shape (headers only)."""
    ckpt = _Checkpoint(Path(folder), cfg, "cpu")
    for name, shape in expected_shapes(cfg).items():
        found = ckpt.shape(name)
        if found is None:
            raise _bad_folder(f"tensor {name} is missing from the checkpoint in {folder}", tensor=name)
        if found != shape:
            raise _bad_folder(f"tensor {name} has shape {found} in {folder}, config.json implies {shape}",
                              tensor=name)


class _Checkpoint:
    """Lazy reader of a checkpoint's tensors, cast to the model dtype on the target device."""

    def __init__(self, folder: Path, cfg: ModelConfig, device: torch.device | str) -> None:
        self.folder, self.dtype, self.device = folder, cfg.dtype, device
        self.where = _tensor_files(folder)
        self.handles: dict[Path, Any] = {}

    def _handle(self, path: Path) -> Any:
        if path not in self.handles:
            self.handles[path] = _open(path)
        return self.handles[path]

    def shape(self, name: str) -> tuple[int, ...] | None:
        path = self.where.get(name)
        return None if path is None else tuple(self._handle(path).get_slice(name).get_shape())

    def maybe(self, name: str) -> torch.Tensor | None:
        path = self.where.get(name)
        if path is None:
            return None
        try:
            tensor = self._handle(path).get_tensor(name)
        except Exception as exc:  # a file cut short after its header
            raise _damaged(path, exc) from None
        return tensor.to(device=self.device, dtype=self.dtype)

    def get(self, name: str) -> torch.Tensor:
        tensor = self.maybe(name)
        if tensor is None:
            raise _bad_folder(f"tensor {name} is missing from the checkpoint in {self.folder}", tensor=name)
        return tensor


def load_hf_weights(folder: str | Path, cfg: ModelConfig, device: torch.device | str = "cpu") -> Weights:
    """Read a Llama-family checkpoint (`model.*` names as transformers saves them) into `Weights`."""
    ckpt = _Checkpoint(Path(folder), cfg, device)
    embed = ckpt.get("model.embed_tokens.weight")
    if tuple(embed.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise _bad_folder(f"embedding shape {tuple(embed.shape)} does not match config.json "
                          f"({cfg.vocab_size}, {cfg.hidden_size})")
    layers = [_load_layer(ckpt, f"model.layers.{i}.", cfg) for i in range(cfg.num_layers)]
    final_norm = ckpt.get("model.norm.weight")
    lm_head = embed if cfg.tie_word_embeddings else ckpt.get("lm_head.weight")
    return Weights(embed, layers, final_norm, lm_head)


def _fused(parts: list[torch.Tensor],
           biases: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack weight rows; a bias for the fused rows (zeros where a part has none), or None."""
    weight = torch.cat(parts)
    if all(b is None for b in biases):
        return weight, None
    return weight, torch.cat([weight.new_zeros(p.shape[0]) if b is None else b
                              for p, b in zip(parts, biases)])


def _load_layer(ckpt: _Checkpoint, prefix: str, cfg: ModelConfig) -> LayerWeights:
    attn, mlp = prefix + "self_attn.", prefix + "mlp."
    wqkv, bqkv = _fused([ckpt.get(f"{attn}{n}_proj.weight") for n in "qkv"],
                        [ckpt.maybe(f"{attn}{n}_proj.bias") for n in "qkv"])
    expected = ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.hidden_size)
    if tuple(wqkv.shape) != expected:
        raise _bad_folder(f"{attn}q/k/v shapes give {tuple(wqkv.shape)}, config.json implies {expected}")
    w_gate_up, b_gate_up = _fused([ckpt.get(f"{mlp}{n}_proj.weight") for n in ("gate", "up")],
                                  [ckpt.maybe(f"{mlp}{n}_proj.bias") for n in ("gate", "up")])
    return LayerWeights(
        attn_norm=ckpt.get(prefix + "input_layernorm.weight"), wqkv=wqkv, bqkv=bqkv,
        wo=ckpt.get(attn + "o_proj.weight"), bo=ckpt.maybe(attn + "o_proj.bias"),
        mlp_norm=ckpt.get(prefix + "post_attention_layernorm.weight"),
        w_gate_up=w_gate_up, b_gate_up=b_gate_up,
        w_down=ckpt.get(mlp + "down_proj.weight"), b_down=ckpt.maybe(mlp + "down_proj.bias"))
