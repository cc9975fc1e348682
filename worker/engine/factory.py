"""Building an engine: the `EngineSpec` a worker's config carries, its flags, and the factories.

Prefill and decode must build the same model to exchange KV: the same checkpoint (a named model
such as `smollm2`, a folder or a .gguf file: pdmesh/models.py resolves each to a cached Hugging
Face folder), or the same preset, dtype, page size and seed (random weights are a pure function
of them). `check_model` reads everything but the weights' values, so an instance can refuse a bad
model before it starts a single rank.

    parser = argparse.ArgumentParser(); add_engine_arguments(parser)
    engine = build_engine(spec_from_args(parser.parse_args()))
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pdmesh.config import env, env_bool
from pdmesh.errors import InvalidArgument
from pdmesh.models import NAMED_MODELS, named_model, resolve_model
from pdmesh.reasons import Reason
from pdmesh.worker.engine.config import PRESETS, ModelConfig, from_hf_config, parse_dtype, preset
from pdmesh.worker.kv.layout import KvLayout
from pdmesh.worker.engine.engine import TorchEngine
from pdmesh.worker.engine.tokenizer import ByteTokenizer, load_hf_tokenizer
from pdmesh.worker.engine.weights import check_hf_weights, load_hf_weights, random_weights


@dataclass(frozen=True)
class EngineSpec:
    """What model a rank runs. Every field has a flag and a `PDMESH_*` variable (see below)."""

    model: str | None = None  # a named model, HF folder or .gguf file; None = random weights of `preset`
    preset: str = "tiny"  # random-weight model: one of config.PRESETS
    dtype: str | None = None  # bf16 | fp16 | fp32 | fp64; None = the preset's or config.json's
    page_size: int | None = None  # tokens per KV page; None = the preset's (16 for checkpoints)
    seed: int = 0  # random weights
    device: str = "cpu"
    batch_invariant: bool | None = None  # None = the preset's or named model's (on for tiny and
    # smollm2), off for other checkpoints
    cache_dir: str | None = None  # where converted models are cached; None = models.default_cache_dir()


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags, each defaulting to its environment variable."""
    parser.add_argument("--model", default=env("MODEL"),
                        help=f"a model name ({', '.join(NAMED_MODELS)}), a local Hugging Face folder "
                             "(config.json, *.safetensors, tokenizer.json) or a Llama .gguf file "
                             "[PDMESH_MODEL]; default: random weights of --model-preset")
    parser.add_argument("--cache-dir", default=env("CACHE_DIR"),
                        help="where named models and .gguf files are converted once and cached "
                             "[PDMESH_CACHE_DIR] (default ~/.cache/pdmesh)")
    parser.add_argument("--model-preset", default=env("MODEL_PRESET", "tiny"), choices=sorted(PRESETS),
                        help="random-weight model size [PDMESH_MODEL_PRESET] (default tiny)")
    parser.add_argument("--dtype", default=env("DTYPE"), choices=["bf16", "fp16", "fp32", "fp64"],
                        help="model and KV dtype [PDMESH_DTYPE]")
    parser.add_argument("--page-size", type=int, default=_int_env("PAGE_SIZE"),
                        help="tokens per KV page [PDMESH_PAGE_SIZE]")
    parser.add_argument("--model-seed", type=int, default=_int_env("MODEL_SEED") or 0,
                        help="seed of random weights [PDMESH_MODEL_SEED] (default 0)")
    parser.add_argument("--device", default=env("DEVICE", "cpu"), help="torch device [PDMESH_DEVICE]")
    parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction,
                        default=env_bool("BATCH_INVARIANT"),
                        help="decode each sequence alone for bit-exact results [PDMESH_BATCH_INVARIANT]")


def _int_env(name: str) -> int | None:
    value = env(name)
    return None if value in (None, "") else int(value)


def spec_from_args(args: argparse.Namespace) -> EngineSpec:
    return EngineSpec(model=args.model or None, preset=args.model_preset, dtype=args.dtype,
                      page_size=args.page_size, seed=args.model_seed, device=args.device,
                      batch_invariant=args.batch_invariant, cache_dir=args.cache_dir)


def random_engine(cfg: ModelConfig | None = None, *, seed: int = 0,
                  device: torch.device | str = "cpu") -> TorchEngine:
    """Seeded random weights (default: the `tiny` preset) with the byte tokenizer."""
    cfg = cfg or PRESETS["tiny"]
    return TorchEngine(cfg, random_weights(cfg, seed, device), ByteTokenizer(), device)


def load_hf_engine(folder: str | Path, *, dtype: torch.dtype | None = None, page_size: int = 16,
                   device: torch.device | str = "cpu", batch_invariant: bool = False,
                   max_seq_len: int | None = None) -> TorchEngine:
    """A Llama-family checkpoint from a local Hugging Face folder, with its own tokenizer."""
    folder = Path(folder)
    cfg = _folder_config(folder, dtype, page_size, max_seq_len).replace(batch_invariant=batch_invariant)
    return TorchEngine(cfg, load_hf_weights(folder, cfg, device), load_hf_tokenizer(folder), device)


def _batch_invariant(spec: EngineSpec) -> bool:
    if spec.batch_invariant is not None:
        return spec.batch_invariant
    named = named_model(spec.model)
    return bool(named and named.batch_invariant)


def build_engine(spec: EngineSpec) -> TorchEngine:
    dtype = parse_dtype(spec.dtype) if spec.dtype else None
    if spec.model:
        return load_hf_engine(resolve_model(spec.model, spec.cache_dir), dtype=dtype,
                              page_size=spec.page_size or 16, device=spec.device,
                              batch_invariant=_batch_invariant(spec))
    cfg = preset(spec.preset, dtype=dtype, page_size=spec.page_size, batch_invariant=spec.batch_invariant)
    return random_engine(cfg, seed=spec.seed, device=spec.device)


def build_layout(spec: EngineSpec) -> KvLayout:
    """The KV layout `build_engine(spec)` would have, without loading or drawing any weights
    (a DP controller publishes it for its ranks)."""
    dtype = parse_dtype(spec.dtype) if spec.dtype else None
    if spec.model:
        return _folder_config(resolve_model(spec.model, spec.cache_dir), dtype, spec.page_size or 16).layout
    return preset(spec.preset, dtype=dtype, page_size=spec.page_size).layout


def _folder_config(folder: Path, dtype: torch.dtype | None, page_size: int,
                   max_seq_len: int | None = None) -> ModelConfig:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InvalidArgument(f"{config_path} is missing; --model wants a model name, a local Hugging "
                              "Face model folder or a .gguf file", reason=Reason.INVALID_MODEL_FOLDER,
                              metadata={"path": folder})
    try:
        raw = json.loads(config_path.read_text())
    except ValueError as exc:
        raise InvalidArgument(f"{config_path} is not valid JSON ({exc})", reason=Reason.INVALID_MODEL_FOLDER,
                              metadata={"path": folder}) from None
    return from_hf_config(raw, dtype=dtype, page_size=page_size, max_seq_len=max_seq_len)


def check_model(spec: EngineSpec) -> str:
    """Everything `build_engine(spec)` would read except the weights' values: the model resolved
    (a named model converted into the cache if needed), its config, tokenizer and the names and
    shapes of its tensors. Raises the typed error a rank would die of; returns a one-line summary."""
    if not spec.model:
        cfg = preset(spec.preset, dtype=parse_dtype(spec.dtype) if spec.dtype else None,
                     page_size=spec.page_size)
        return f"random weights of preset {spec.preset} ({cfg.num_layers} layers, {cfg.dtype})"
    folder = resolve_model(spec.model, spec.cache_dir)
    cfg = _folder_config(folder, parse_dtype(spec.dtype) if spec.dtype else None, spec.page_size or 16)
    check_hf_weights(folder, cfg)
    tokenizer = load_hf_tokenizer(folder)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise InvalidArgument(f"the tokenizer in {folder} has {tokenizer.vocab_size} ids but the model "
                              f"only {cfg.vocab_size}", reason=Reason.INVALID_MODEL_CONFIG)
    return (f"{spec.model} from {folder} ({cfg.num_layers} layers, vocabulary {tokenizer.vocab_size}, "
            f"{cfg.dtype}, EOS {sorted(tokenizer.eos_ids)})")
