"""The engine against transformers: a small random `LlamaForCausalLM` saved to a folder, loaded by
`load_hf_engine`, must give transformers' logits for the prompt and for every decode step, through
shuffled, non-contiguous page tables with pages of 1 and of several tokens."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from pdmesh.errors import InvalidArgument  # noqa: E402
from pdmesh.worker.engine import DecodeItem, colocated_generate, load_hf_engine  # noqa: E402
from pdmesh.worker.engine.tokenizer import load_hf_tokenizer  # noqa: E402

CORPUS = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
          "prefill and decode share the key value cache", "héllo wörld, ünïcode"] * 4
PROMPT = "the lazy fox packs a box of keys"

VARIANTS = {
    # grouped-query attention, untied head, plain rope with a non-default theta, one file
    "plain": dict(config=dict(num_key_value_heads=2, rope_theta=5000.0), shard=None),
    # Llama 3.1 rope scaling (short original context, so it shows), tied embeddings, biases,
    # multi-query attention, a sharded checkpoint with an index
    "llama3": dict(config=dict(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
                               mlp_bias=True, rope_parameters=dict(
                                   rope_type="llama3", rope_theta=10000.0, factor=4.0,
                                   low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=16)),
                   shard="40KB"),
}


def save_tokenizer(folder) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))


def save_model(folder, config: dict, shard: str | None):
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=0,
                                   eos_token_id=1, **config)
    torch.manual_seed(1234)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():  # weights of order one, so logits differ visibly between tokens
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.0 if "embed" in name else p.shape[-1] ** -0.5))
    model.save_pretrained(folder, max_shard_size=shard) if shard else model.save_pretrained(folder)
    save_tokenizer(folder)
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = save_model(folder, **VARIANTS[request.param])
    return request.param, folder, model


def _rms_norm_in_input_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """transformers' logits [T, vocab]. Its RMSNorm casts to float32 even in a float64 model (the
    engine keeps float64), so for float64 the norm runs in float64 here: then the two agree to
    ~1e-14 and the test can demand 1e-9 instead of float32's 1e-5."""
    from transformers.models.llama import modeling_llama

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        if model.dtype == torch.float64:
            patch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
        return model(input_ids=torch.tensor([ids])).logits[0]


def shuffled_pages(n_needed: int, pool_pages: int, seed: int) -> list[int]:
    pages = list(range(pool_pages))
    random.Random(seed).shuffle(pages)
    return pages[:n_needed]


def test_sharded_variant_has_an_index(checkpoint):
    name, folder, _ = checkpoint
    assert (folder / "model.safetensors.index.json").is_file() == (VARIANTS[name]["shard"] is not None)
    if name == "llama3":
        assert len(list(folder.glob("*.safetensors"))) > 1


@pytest.mark.parametrize("page_size", [1, 4])
def test_prefill_and_decode_logits_match_transformers(checkpoint, page_size):
    _, folder, model = checkpoint
    engine = load_hf_engine(folder, page_size=page_size)
    assert engine.config.dtype == torch.float64  # from config.json
    prompt = engine.tokenizer.encode(PROMPT)
    steps = 12
    total = len(prompt) + steps
    pool_pages = 3 * engine.layout.pages_for_tokens(total)
    kv = engine.new_kv_pool(pool_pages)
    pages = shuffled_pages(engine.layout.pages_for_tokens(total), pool_pages, seed=page_size)
    assert pages != sorted(pages)

    ours = [engine.prefill_logits(prompt, kv, pages)]
    seq = prompt + [int(ours[0][-1].argmax())]
    for _ in range(steps):
        item = DecodeItem(seq[-1], len(seq) - 1, pages)
        ours.append(engine.decode_logits(kv, [item]))
        seq.append(int(ours[-1][0].argmax()))
    theirs = hf_logits(model, seq[:-1])  # position t predicts token t + 1
    torch.testing.assert_close(torch.cat(ours), theirs, rtol=1e-9, atol=1e-9)


def test_float32_override_matches_within_float32_tolerance(checkpoint):
    _, folder, model = checkpoint
    engine = load_hf_engine(folder, dtype=torch.float32, page_size=2)
    prompt = engine.tokenizer.encode(PROMPT)
    kv = engine.new_kv_pool(engine.layout.pages_for_tokens(len(prompt)) + 3)
    pages = shuffled_pages(engine.layout.pages_for_tokens(len(prompt)), kv.shape[2], seed=7)
    ours = engine.prefill_logits(prompt, kv, pages)
    assert ours.dtype == torch.float32
    theirs = hf_logits(copy.deepcopy(model).to(torch.float32), prompt)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_greedy_generation_follows_transformers_argmax(checkpoint):
    _, folder, model = checkpoint
    engine = load_hf_engine(folder, page_size=3)
    prompt = engine.tokenizer.encode(PROMPT)
    gen = colocated_generate(engine, prompt, 10, stop_on_eos=False)
    logits = hf_logits(model, list(prompt) + list(gen.output_ids[:-1]))[len(prompt) - 1:]
    top2 = logits.topk(2, dim=-1).values
    assert bool(((top2[:, 0] - top2[:, 1]) > 1e-4).all()), "a near-tie would make argmax fragile"
    assert list(gen.output_ids) == logits.argmax(-1).tolist()
    assert isinstance(engine.tokenizer.decode(gen.output_ids), str)


def test_tokenizer_loader_matches_transformers(tmp_path):
    save_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    ours = load_hf_tokenizer(tmp_path)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in [PROMPT, "héllo wörld", "unseen zebra 123"]:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"]
        assert ids[0] == ours.bos_id == 0
        assert ours.decode(ids) == text  # byte-level BPE round-trips, BOS left out
    assert ours.eos_ids == {1, 2} and ours.eos_id == 1
    assert ours.vocab_size == 300


def test_bad_model_folders_fail_typed(tmp_path):
    with pytest.raises(InvalidArgument) as err:
        load_hf_engine(tmp_path)
    assert err.value.reason == "INVALID_MODEL_FOLDER"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(InvalidArgument) as err:
        load_hf_engine(tmp_path)
    assert err.value.reason == "INVALID_MODEL_CONFIG"


def test_transformers_4_style_llama31_config_is_read():
    """Llama 3.1 8B's config.json as transformers 4 wrote it: rope_theta at the top level, rope
    scaling under `rope_scaling`, `torch_dtype`, no head_dim."""
    from pdmesh.worker.engine.config import from_hf_config

    cfg = from_hf_config({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-05,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "rope_scaling": {
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}})
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.rope_type, cfg.rope_theta) == (128, 8, "llama3", 500000.0)
    assert (cfg.rope_factor, cfg.rope_original_max_positions, cfg.dtype) == (8.0, 8192, torch.bfloat16)
    assert cfg.layout.request_bytes(1) == 32 * 2 * 16 * 8 * 128 * 2
    with pytest.raises(InvalidArgument):
        from_hf_config({"model_type": "mistral", "sliding_window": 4096, "hidden_size": 8,
                        "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 8,
                        "vocab_size": 8})
