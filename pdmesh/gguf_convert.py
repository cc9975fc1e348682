"""A GGUF file -> a Hugging Face model folder that the engine's loader reads.

`convert_gguf(path, folder)` writes what `load_hf_engine` expects: config.json, model.safetensors
(float32), tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json.
It needs no torch (the `gguf` package's numpy reader and dequantizer, `tokenizers`, `safetensors`),
so the router side can build the same folder for its chat template.

What a conversion must undo:
- quantization: every tensor is dequantized to float32 with `gguf.quants.dequantize`; a type that
  dequantizer does not know (Q8_1, integer tensors, ...) is refused before any work is done;
- llama.cpp's Q/K row permutation: its converter reorders each head's rows of `attn_q`/`attn_k`
  from the half-split rotary layout (what transformers uses) to interleaved pairs; the inverse
  (as transformers' GGUF loader applies it) is `w.reshape(heads, d // 2, 2, in).swapaxes(1, 2)`,
  with the KV head count for `attn_k`;
- names: `blk.N.attn_q` -> `model.layers.N.self_attn.q_proj`, ... (`_NAMES`); no `output.weight`
  means the output head is the tied embedding.

The tokenizer is byte-level BPE (`tokenizer.ggml.model == "gpt2"`) built from the vocabulary and
merges in the metadata, with the pre-tokenizer that `tokenizer.ggml.pre` names (llama.cpp's
regexes: `smollm` splits digits one by one before the GPT-2 split); control tokens become special
tokens. Only the `llama` architecture is converted: anything else is refused, typed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from pdmesh.errors import InvalidArgument
from pdmesh.reasons import Reason

SUPPORTED_ARCHITECTURES = ("llama",)
_NAMES = {  # GGUF tensor name (after `blk.N.`) -> transformers' name (after `model.layers.N.`)
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
PRE_TOKENIZERS = ("default", "gpt2", "smollm")


def _unsupported(message: str, reason: str, **metadata: object) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, metadata=metadata)


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` of `path`, or INVALID_MODEL_FILE saying what is wrong with the file."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"it starts with {magic!r}, not the GGUF magic")
        return GGUFReader(path)
    except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        raise _unsupported(f"{path} is not a readable GGUF file ({exc}); reinstall or download it "
                           "again", Reason.INVALID_MODEL_FILE, path=path) from None


def metadata(reader) -> dict[str, Any]:
    """The GGUF key/value metadata as plain Python values."""
    return {key: field.contents() for key, field in reader.fields.items()}


def check_supported(reader, meta: dict[str, Any]) -> None:
    """Refuse, before any dequantization, what this converter or the engine cannot run."""
    from gguf.quants import GGMLQuantizationType, _type_traits

    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise _unsupported(f"the GGUF architecture {arch!r} is not one this engine runs "
                           f"({', '.join(SUPPORTED_ARCHITECTURES)}); use a Llama-architecture GGUF, "
                           "or a Hugging Face folder of a llama, mistral or qwen2 model",
                           Reason.UNSUPPORTED_MODEL_ARCHITECTURE, architecture=arch)
    known = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in known})
    if bad:
        raise _unsupported(f"GGUF tensor type(s) {', '.join(bad)} cannot be dequantized here (the gguf "
                           "package reads F32, F16, BF16, Q4_0..Q8_0, the K and IQ quants); use a file "
                           "quantized with one of those", Reason.UNSUPPORTED_GGUF_QUANTIZATION, types=",".join(bad))
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", "linear"):
        raise _unsupported("this GGUF scales rotary frequencies in a way the converter does not read "
                           "(rope_freqs / yarn); use the model's Hugging Face folder instead",
                           Reason.UNSUPPORTED_MODEL_ARCHITECTURE)
    tok_model = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if tok_model != "gpt2" or pre not in PRE_TOKENIZERS:
        raise _unsupported(f"the GGUF tokenizer {tok_model!r} (pre-tokenizer {pre!r}) is not supported: "
                           f"byte-level BPE ('gpt2') with pre-tokenizer {', '.join(PRE_TOKENIZERS)} is; "
                           "use the model's Hugging Face folder", Reason.UNSUPPORTED_MODEL_ARCHITECTURE,
                           tokenizer=tok_model, pre=pre)


def hf_config(reader, meta: dict[str, Any]) -> dict[str, Any]:
    """config.json of the model (transformers' Llama spelling)."""
    arch = meta["general.architecture"]

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise _unsupported(f"GGUF metadata {arch}.{name} is missing", Reason.INVALID_MODEL_FILE)
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise _unsupported("partial rotary embeddings are not supported", Reason.UNSUPPORTED_MODEL_ARCHITECTURE)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)), "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length")),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    return cfg


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: rows [heads, d/2, 2] -> [heads, 2, d/2] (rotate-half)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_tensor_name(name: str) -> tuple[str, str | None]:
    """GGUF tensor name -> (transformers' name, the block part such as `attn_q`, or None)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name], None
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not match or match.group(2) not in _NAMES:
        raise _unsupported(f"GGUF tensor {name!r} has no place in a Llama model", Reason.UNSUPPORTED_MODEL_ARCHITECTURE,
                           tensor=name)
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_NAMES[part]}.{kind}", part


def tensors(reader, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor, dequantized to float32 [out, in], named and laid out as transformers has it."""
    from gguf.quants import dequantize

    out = {}
    for tensor in reader.tensors:
        name, part = hf_tensor_name(tensor.name)
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        expected = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if weight.shape != expected:
            raise _unsupported(f"GGUF tensor {tensor.name} reads as {weight.shape}, its header says "
                               f"{expected}: the file is damaged", Reason.INVALID_MODEL_FILE, tensor=tensor.name)
        if part == "attn_q":
            weight = unpermute(weight, cfg["num_attention_heads"])
        elif part == "attn_k":
            weight = unpermute(weight, cfg["num_key_value_heads"])
        out[name] = np.ascontiguousarray(weight)
    return out


def hf_tokenizer(meta: dict[str, Any]):
    """A `tokenizers.Tokenizer` from the GGUF vocabulary, merges, token types and special ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre", "default") == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


_SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
                 "pad": "padding_token_id"}


def _special(meta: dict[str, Any], name: str) -> str | None:
    index = meta.get(f"tokenizer.ggml.{_SPECIAL_KEYS[name]}")
    return None if index is None else meta["tokenizer.ggml.tokens"][index]


def convert_gguf(path: str | Path, folder: str | Path) -> Path:
    """Write the Hugging Face folder of the GGUF model at `path` into `folder` (created)."""
    from safetensors.numpy import save_file

    reader = open_gguf(path)
    meta = metadata(reader)
    check_supported(reader, meta)
    cfg = hf_config(reader, meta)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors(reader, cfg), str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_tokenizer(meta).save(str(folder / "tokenizer.json"))
    eos = [i for i in (meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id"))
           if i is not None]
    generation = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": list(dict.fromkeys(eos)),
                  "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg["max_position_embeddings"],
                  "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                  **{f"{n}_token": _special(meta, n) for n in ("bos", "eos", "unk", "pad")}}
    template = meta.get("tokenizer.chat_template")
    if template:
        (folder / "chat_template.jinja").write_text(template)
    for name, content in (("config.json", cfg), ("generation_config.json", generation),
                          ("tokenizer_config.json", tok_config)):
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    return folder
