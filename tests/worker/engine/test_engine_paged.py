"""The random-weight engine: exactness across batching, pools and processes; paged attention
against a dense pass; sampling; input checks; the byte tokenizer; flags and threads."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from pdmesh.errors import InvalidArgument
from pdmesh.worker.engine import (PRESETS, DecodeItem, Engine, SamplingParams, TorchEngine,
                                  add_engine_arguments, build_engine, colocated_generate,
                                  configure_torch_threads, kv_by_token, random_engine, spec_from_args)
from pdmesh.worker.engine.sampling import sample
from pdmesh.worker.engine.tokenizer import ByteTokenizer

PROMPTS = ["Hello, world!", "Prefill and decode, disaggregated.", "ünïcode ✓", "a" * 40]


@pytest.fixture(scope="module")
def engine() -> TorchEngine:
    return random_engine()  # the `tiny` preset: float64, batch-invariant, pages of 16 tokens


def test_tiny_preset_is_the_exact_configuration(engine):
    assert isinstance(engine, Engine)
    assert engine.config.dtype == torch.float64 and engine.config.batch_invariant
    assert engine.layout.page_size == 16 and engine.layout.dtype == torch.float64


def test_byte_tokenizer_round_trips_text():
    tok = ByteTokenizer()
    for text in PROMPTS + [""]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id == 256 and all(0 <= i < 256 for i in ids[1:])
        assert tok.decode(ids + [tok.eos_id]) == text
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a cut UTF-8 sequence still decodes
    assert tok.eos_ids == {257} and tok.vocab_size == 258


def test_batched_decode_after_a_page_copy_equals_each_sequence_alone(engine):
    """PD in one process: prefill into pool A, copy the pages into other pages of pool B (what a
    transfer does), decode all sequences together in B, with sequences joining the batch at
    different steps. Tokens and KV must equal a colocated run of each sequence alone, bit for bit:
    see TorchEngine's docstring for why this is exact (per-row decode, float64, fixed threads)."""
    steps, size = 24, engine.layout.page_size
    alone = [colocated_generate(engine, engine.tokenizer.encode(p), steps, stop_on_eos=False)
             for p in PROMPTS]
    pool_a, pool_b = engine.new_kv_pool(40), engine.new_kv_pool(40)
    free_a, free_b = list(range(40)), list(range(39, -1, -1))
    seqs = []
    for i, prompt in enumerate(PROMPTS):
        ids = engine.tokenizer.encode(prompt)
        pages_a = [free_a.pop(i % len(free_a)) for _ in range(engine.layout.pages_for_tokens(len(ids)))]
        first = engine.prefill(ids, pool_a, pages_a)
        pages_b = [free_b.pop(0) for _ in pages_a]
        pool_b[:, :, pages_b] = pool_a[:, :, pages_a]  # the transfer, in staging order
        seqs.append({"ids": ids, "out": [first], "pages": pages_b, "join": 2 * i})
    for step in range(steps - 1 + 2 * (len(PROMPTS) - 1)):
        batch, members = [], []
        for s in seqs:
            if s["join"] <= step and len(s["out"]) < steps:
                pos = len(s["ids"]) + len(s["out"]) - 1
                if pos % size == 0 and pos // size == len(s["pages"]):
                    s["pages"].append(free_b.pop(0))
                batch.append(DecodeItem(s["out"][-1], pos, list(s["pages"])))
                members.append(s)
        for s, tok in zip(members, engine.decode_step(pool_b, batch)):
            s["out"].append(tok)
    assert len({t for ref in alone for t in ref.output_ids}) > 10  # not one token repeated
    for s, ref in zip(seqs, alone):
        assert tuple(s["out"]) == ref.output_ids
        assert torch.equal(kv_by_token(pool_b, s["pages"], len(s["ids"])), ref.prompt_kv)
        assert torch.equal(kv_by_token(pool_b, s["pages"], len(s["ids"]) + steps - 1), ref.sequence_kv)


def test_decode_logits_do_not_depend_on_the_batch(engine):
    kv = engine.new_kv_pool(32)
    items = []
    for i, prompt in enumerate(PROMPTS):
        ids = engine.tokenizer.encode(prompt)
        pages = list(range(8 * i, 8 * i + 8))
        items.append(DecodeItem(engine.prefill(ids, kv, pages), len(ids), pages))
    batched_kv, alone_kv = kv.clone(), kv.clone()
    batched = engine.decode_logits(batched_kv, items)
    alone = torch.cat([engine.decode_logits(alone_kv, [item]) for item in reversed(items)]).flip(0)
    assert torch.equal(batched, alone) and torch.equal(batched_kv, alone_kv)


def test_a_second_process_computes_the_same_bits(engine, tmp_path):
    """What the end-to-end tests rely on: a separate process, same seed and thread count."""
    out = tmp_path / "gen.pt"
    code = ("import sys, torch\n"
            "from pdmesh.worker.engine import configure_torch_threads, random_engine, colocated_generate\n"
            "configure_torch_threads(); e = random_engine()\n"
            "g = colocated_generate(e, e.tokenizer.encode(sys.argv[2]), 16, stop_on_eos=False, page_seed=5)\n"
            "torch.save({'out': g.output_ids, 'kv': g.sequence_kv}, sys.argv[1])\n")
    env = dict(os.environ, PDMESH_TORCH_THREADS="1")
    subprocess.run([sys.executable, "-c", code, str(out), PROMPTS[1]], check=True, env=env, timeout=120)
    theirs = torch.load(out)
    ours = colocated_generate(engine, engine.tokenizer.encode(PROMPTS[1]), 16, stop_on_eos=False)
    assert theirs["out"] == ours.output_ids
    assert torch.equal(theirs["kv"], ours.sequence_kv)


@pytest.mark.parametrize("page_size", [1, 16])
def test_paged_decode_matches_a_dense_prompt_pass(page_size):
    engine = random_engine(PRESETS["tiny"].replace(page_size=page_size))
    ids = engine.tokenizer.encode(PROMPTS[1])
    gen = colocated_generate(engine, ids, 12, stop_on_eos=False, page_seed=3)
    assert list(gen.page_ids) != sorted(gen.page_ids)
    full = ids + list(gen.output_ids[:-1])
    kv = engine.new_kv_pool(engine.layout.pages_for_tokens(len(full)))
    dense = engine.prefill_logits(full, kv, list(range(kv.shape[2])))
    assert dense[len(ids) - 1:].argmax(-1).tolist() == list(gen.output_ids)
    # the same weights with pages of 1 and of 16 tokens give the same answer
    assert gen.output_ids == colocated_generate(random_engine(), ids, 12, stop_on_eos=False).output_ids
    # decode logits equal the dense pass within float64 rounding
    pages = list(gen.page_ids)
    kv2 = engine.new_kv_pool(max(pages) + 1)
    engine.prefill(ids, kv2, pages)
    for t in range(len(ids), len(full)):
        step = engine.decode_logits(kv2, [DecodeItem(full[t], t, pages)])[0]
        torch.testing.assert_close(step, dense[t], rtol=1e-10, atol=1e-10)


def test_generation_stops_at_an_eos_id(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    free_run = colocated_generate(engine, ids, 12, stop_on_eos=False).output_ids
    stop = free_run[4]

    class StopAt(ByteTokenizer):
        @property
        def eos_ids(self) -> frozenset[int]:
            return frozenset({stop})

    stopping = TorchEngine(engine.config, engine.model.weights, StopAt())
    gen = colocated_generate(stopping, ids, 12)
    assert gen.finish_reason == "stop" and gen.output_ids == free_run[:free_run.index(stop) + 1]
    assert colocated_generate(engine, ids, 5).finish_reason == "length"


def test_sampling_is_a_pure_function_of_seed_and_position():
    logits = torch.randn(258, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    greedy = int(logits.argmax())
    assert sample(logits, SamplingParams(), 7) == greedy
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1, seed=3), 7) == greedy
    assert sample(logits, SamplingParams(temperature=1.0, top_p=1e-9, seed=3), 7) == greedy
    hot = SamplingParams(temperature=2.0, top_p=0.9, seed=11)
    draws = [sample(logits, hot, p) for p in range(40)]
    assert draws == [sample(logits, hot, p) for p in range(40)]
    assert len(set(draws)) > 5
    other_seed = SamplingParams(temperature=2.0, top_p=0.9, seed=12)
    assert draws != [sample(logits, other_seed, p) for p in range(40)]
    top5 = set(logits.topk(5).indices.tolist())
    assert {sample(logits, SamplingParams(temperature=5.0, top_k=5, seed=s), 0) for s in range(60)} <= top5
    with pytest.raises(InvalidArgument):
        SamplingParams(top_p=0.0)


def test_seeded_sampling_survives_a_prefill_decode_split(engine):
    params = SamplingParams(temperature=1.5, top_p=0.95, seed=42)
    ids = engine.tokenizer.encode(PROMPTS[2])
    a = colocated_generate(engine, ids, 10, params, stop_on_eos=False, page_seed=1)
    b = colocated_generate(engine, ids, 10, params, stop_on_eos=False, page_seed=None)
    assert a.output_ids == b.output_ids
    greedy = colocated_generate(engine, ids, 10, stop_on_eos=False).output_ids
    assert a.output_ids != greedy


BAD_CALLS = {
    "empty prompt": ("INVALID_PROMPT", lambda e, kv: e.prefill([], kv, [0])),
    "token outside vocab": ("INVALID_TOKEN_ID", lambda e, kv: e.prefill([1, 258], kv, [0])),
    "too few pages": ("INVALID_PAGE_TABLE", lambda e, kv: e.prefill([1] * 17, kv, [0])),
    "page out of range": ("INVALID_PAGE_TABLE", lambda e, kv: e.prefill([1] * 17, kv, [0, 4])),
    "duplicate page": ("INVALID_PAGE_TABLE", lambda e, kv: e.prefill([1] * 17, kv, [2, 2])),
    "prompt too long": ("SEQUENCE_TOO_LONG", lambda e, kv: e.prefill([1] * 4096, kv, list(range(4)))),
    "wrong pool dtype": ("KV_POOL_MISMATCH", lambda e, kv: e.prefill([1], kv.float(), [0])),
    "decode page table short": ("INVALID_PAGE_TABLE",
                                lambda e, kv: e.decode_step(kv, [DecodeItem(1, 16, [0])])),
    "decode negative position": ("SEQUENCE_TOO_LONG",
                                 lambda e, kv: e.decode_step(kv, [DecodeItem(1, -1, [0])])),
    "two items one slot": ("INVALID_PAGE_TABLE", lambda e, kv: e.decode_step(
        kv, [DecodeItem(1, 3, [1]), DecodeItem(2, 3, [1])])),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_fails_typed_and_writes_nothing(engine, case):
    reason, call = BAD_CALLS[case]
    kv = engine.new_kv_pool(4)
    with pytest.raises(InvalidArgument) as err:
        call(engine, kv)
    assert err.value.reason == reason
    assert not kv.any()


def test_empty_decode_batch(engine):
    assert engine.decode_step(engine.new_kv_pool(1), []) == []


def test_flags_and_environment_build_the_engine(monkeypatch):
    monkeypatch.setenv("PDMESH_PAGE_SIZE", "4")
    monkeypatch.setenv("PDMESH_MODEL_SEED", "9")
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    spec = spec_from_args(parser.parse_args(["--dtype", "fp32", "--no-batch-invariant"]))
    assert (spec.page_size, spec.seed, spec.dtype) == (4, 9, "fp32")
    assert spec.batch_invariant is False and spec.model is None
    built = build_engine(spec)
    assert built.layout.page_size == 4 and built.config.dtype == torch.float32
    assert not built.config.batch_invariant
    other_seed = build_engine(spec_from_args(parser.parse_args(["--model-seed", "10"])))
    assert not torch.equal(built.model.weights.embed.double(), other_seed.model.weights.embed)


def test_bench_geometry_preset_runs():
    cfg = PRESETS["bench-kv"]
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (32, 8, 128)
    small = random_engine(cfg.replace(num_layers=2))  # same shapes per layer, fewer layers
    gen = colocated_generate(small, small.tokenizer.encode(PROMPTS[0]), 3, stop_on_eos=False)
    assert gen.prompt_kv.dtype == torch.bfloat16 and gen.prompt_kv.shape == (2, 2, 14, 8, 128)
    assert gen.prompt_kv.abs().sum() > 0


def test_torch_threads_follow_the_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("PDMESH_TORCH_THREADS", "2")
        assert configure_torch_threads() == 2 and torch.get_num_threads() == 2
        assert configure_torch_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError):
            configure_torch_threads(0)
    finally:
        torch.set_num_threads(before)


def test_threads_that_run_torch_ops_take_the_configured_count():
    """apply_torch_threads gives the calling thread configure_torch_threads' count, whatever
    that thread had; the engine thread and the transfer executors start with it (on the H100 a
    prefill on a thread without it ran 5-14 ms slower: bench/_gpu_thread_gap.py)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from pdmesh.worker.engine.runtime import apply_torch_threads
    from pdmesh.worker.rank.pages import EngineThread
    from pdmesh.worker.transfer import KvReceiver, KvSender

    before = torch.get_num_threads()
    try:
        configure_torch_threads(1)

        def elsewhere() -> tuple[int, int]:
            torch.set_num_threads(2)  # a thread whose count someone changed
            changed = torch.get_num_threads()
            apply_torch_threads()
            return changed, torch.get_num_threads()

        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(elsewhere).result() == (2, 1)

        async def counts() -> list[int]:
            engine_thread = EngineThread()
            sender, receiver = KvSender("inproc", epoch=1), KvReceiver("inproc")
            loop = asyncio.get_running_loop()
            try:
                return [await engine_thread.run(torch.get_num_threads),
                        await loop.run_in_executor(sender._executor, torch.get_num_threads),
                        await loop.run_in_executor(receiver._executor, torch.get_num_threads)]
            finally:
                engine_thread.shutdown()
                await sender.close()
                await receiver.close()

        assert asyncio.run(counts()) == [1, 1, 1]
    finally:
        configure_torch_threads(before)


def test_command_line_generates_text(engine):
    prompt = "Text in, text out"
    run = subprocess.run([sys.executable, "-m", "pdmesh.worker.engine", prompt, "--max-new-tokens", "12"],
                         capture_output=True, timeout=120,
                         env=dict(os.environ, PDMESH_TORCH_THREADS="1", PYTHONIOENCODING="utf-8"))
    assert run.returncode == 0, run.stderr
    gen = colocated_generate(engine, engine.tokenizer.encode(prompt), 12)
    assert run.stdout.decode() == engine.tokenizer.decode(gen.output_ids) + "\n"
    assert b"prompt tokens" in run.stderr
