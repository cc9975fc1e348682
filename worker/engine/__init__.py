"""The model engine of a DP rank: the `Engine` protocol, a Llama-style torch decoder over the
paged KV pool (seeded random weights with a byte tokenizer, or a Hugging Face checkpoint: a local
folder, or a named model / GGUF file that pdmesh/models.py converts once into a cached folder),
sampling, and the colocated reference that end-to-end tests and benchmarks compare against.

Modules: protocol (the contract), config (sizes and presets), tokenizer, weights, layers, model
(forward passes), sampling, engine (`TorchEngine`), factory (flags -> engine), reference
(colocated generation and TTFT), runtime (PDMESH_TORCH_THREADS).
"""

from pdmesh.worker.engine.config import PRESETS, ModelConfig
from pdmesh.worker.engine.engine import TorchEngine
from pdmesh.worker.engine.factory import (EngineSpec, add_engine_arguments, build_engine,
                                          load_hf_engine, random_engine, spec_from_args)
from pdmesh.worker.engine.protocol import GREEDY, DecodeItem, Engine, SamplingParams, Tokenizer
from pdmesh.worker.engine.reference import (Generation, colocated_generate, empty_kv_pool,
                                            kv_by_token, time_colocated_prefill)
from pdmesh.worker.engine.runtime import configure_torch_threads

__all__ = [
    "GREEDY", "PRESETS", "DecodeItem", "Engine", "EngineSpec", "Generation", "ModelConfig",
    "SamplingParams", "Tokenizer", "TorchEngine", "add_engine_arguments", "build_engine",
    "colocated_generate", "configure_torch_threads", "empty_kv_pool", "kv_by_token",
    "load_hf_engine", "random_engine", "spec_from_args", "time_colocated_prefill",
]
