"""`make bench` part `model`: the real default model (`smollm2`, SmolLM2-135M-Instruct) on this machine.

1. Start-up, each in a fresh Python process (imports count, as they do for a rank): converting the
   GGUF into the model cache (once per machine), beside loading the cached folder into an engine
   (what every later start pays).
Each figure is given as wall time and as CPU time: the machine is shared, and CPU time (one torch
thread, so one core) is what the work costs whatever else runs beside it.

2. Decode: ms per token of one sequence (greedy, batch 1, after a chat prompt), pdmesh's engine
   beside transformers' `LlamaForCausalLM` stepping with its own KV cache (the baseline), on the
   same weights and the same number of torch threads.
3. What batch-invariant decode (the default for smollm2: exact PD == colocated under any batching)
   costs: ms per decode step of a batch of 4 with it on and off.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from pdmesh.chat import apply_chat_template
from pdmesh.models import resolve_model
from pdmesh.worker.engine import DecodeItem, load_hf_engine
from pdmesh.worker.engine.runtime import configure_torch_threads

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
BUILD = "from pdmesh.models import resolve_model; import sys; resolve_model('smollm2', sys.argv[1])"
LOAD = ("import sys; from pdmesh.worker.engine.runtime import configure_torch_threads; configure_torch_threads(); "
        "from pdmesh.worker.engine.factory import EngineSpec, build_engine; "
        "build_engine(EngineSpec(model='smollm2', cache_dir=sys.argv[1]))")


class Timer:
    """Wall and CPU seconds of what runs inside (this process, or its children when `children`)."""

    def __init__(self, children: bool = False) -> None:
        self.who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF

    def _cpu(self) -> float:
        usage = resource.getrusage(self.who)
        return usage.ru_utime + usage.ru_stime

    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *_) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu() - self.cpu


def _median(timers: list[Timer], scale: float = 1.0) -> tuple[float, float]:
    return (statistics.median(t.wall for t in timers) * scale, statistics.median(t.cpu for t in timers) * scale)


def _process(code: str, cache: str) -> Timer:
    with Timer(children=True) as timer:
        subprocess.run([sys.executable, "-c", code, cache], check=True)
    return timer


def startup(repeats: int) -> list[str]:
    builds, loads = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="pdmesh-bench-cache-") as cache:
            builds.append(_process(BUILD, cache))
            loads.append(_process(LOAD, cache))
    (build, build_cpu), (load, load_cpu) = _median(builds), _median(loads)
    return ["| start of a fresh process | wall s | CPU s | CPU vs cache build |", "| --- | ---: | ---: | ---: |",
            f"| GGUF -> cache folder (first start on a machine) | {build:.1f} | {build_cpu:.1f} | 1.00 |",
            f"| engine from the cached folder (every later start) | {load:.1f} | {load_cpu:.1f} | "
            f"{load_cpu / build_cpu:.2f} |"]


def _ours(engine, prompt: list[int], steps: int) -> list[Timer]:
    kv = engine.new_kv_pool(engine.layout.pages_for_tokens(len(prompt) + steps) + 1)
    pages = list(range(kv.shape[2]))
    token, timers = engine.prefill(prompt, kv, pages), []
    for i in range(steps):
        with Timer() as timer:
            token = engine.decode_step(kv, [DecodeItem(token, len(prompt) + i, tuple(pages))])[0]
        timers.append(timer)
    return timers


def _transformers(folder, prompt: list[int], steps: int) -> list[Timer]:
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    timers = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            with Timer() as timer:
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            timers.append(timer)
    return timers


def _batch_steps(engine, prompts: list[list[int]], steps: int) -> list[Timer]:
    per = engine.layout.pages_for_tokens(max(map(len, prompts)) + steps)
    kv = engine.new_kv_pool(per * len(prompts))
    tables = [tuple(range(i * per, (i + 1) * per)) for i in range(len(prompts))]
    tokens = [engine.prefill(p, kv, t) for p, t in zip(prompts, tables)]
    timers = []
    for s in range(steps):
        batch = [DecodeItem(tok, len(p) + s, t) for tok, p, t in zip(tokens, prompts, tables)]
        with Timer() as timer:
            tokens = engine.decode_step(kv, batch)
        timers.append(timer)
    return timers


def decode(steps: int) -> list[str]:
    threads = configure_torch_threads()
    folder = resolve_model("smollm2")
    prompt = apply_chat_template(QUESTION, tokenize=True)
    exact = load_hf_engine(folder, batch_invariant=True)
    prompts = [apply_chat_template([{"role": "user", "content": q}], tokenize=True)
               for q in ("Name one primary color.", "What is 2 + 3?", "Say hello.", "Why is the sky blue?")]
    cases = [("transformers LlamaForCausalLM, batch 1 (baseline)", _transformers(folder, prompt, steps)),
             ("pdmesh engine, batch 1", _ours(exact, prompt, steps)),
             ("pdmesh engine, batch 4, batch-invariant off",
              _batch_steps(load_hf_engine(folder, batch_invariant=False), prompts, steps)),
             ("pdmesh engine, batch 4, batch-invariant on (smollm2's default)",
              _batch_steps(exact, prompts, steps))]
    rows = [f"Decode, {threads} torch thread(s), float32, after a {len(prompt)}-token chat prompt, "
            f"median of {steps} steps:", "",
            "| decode | wall ms per step | CPU ms per step | CPU vs baseline |", "| --- | ---: | ---: | ---: |"]
    base_cpu = _median(cases[0][1], 1e3)[1]
    for label, timers in cases:
        wall, cpu = _median(timers, 1e3)
        rows.append(f"| {label} | {wall:.1f} | {cpu:.1f} | {cpu / base_cpu:.2f} |")
    return rows


def run(args) -> str:
    rows = startup(1 if args.quick else 3)
    rows += ["", *decode(8 if args.quick else 32)]
    return "\n".join(rows) + "\n"
