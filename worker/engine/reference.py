"""The colocated reference: one engine doing prefill and decode with a page list of its own.

End-to-end tests compare what a PD pair produces with `colocated_generate` token for token and
KV bit for bit; benchmarks time `time_colocated_prefill` as the TTFT of a colocated engine.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from pdmesh.errors import InvalidArgument
from pdmesh.reasons import Reason
from pdmesh.worker.engine.protocol import GREEDY, DecodeItem, Engine, SamplingParams


def empty_kv_pool(engine: Engine, num_pages: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zeroed pool tensor [L, 2, num_pages, page_size, Hkv, D] of the engine's layout."""
    lay = engine.layout
    return torch.zeros((lay.num_layers, 2, num_pages, lay.page_size, lay.num_kv_heads, lay.head_dim),
                       dtype=lay.dtype, device=device)


def kv_by_token(kv: torch.Tensor, page_ids: Sequence[int], num_tokens: int) -> torch.Tensor:
    """The K/V of a sequence's first `num_tokens` positions, [L, 2, num_tokens, Hkv, D].

    Whole pages in staging order are `kv[:, :, page_ids]`; this drops the unused tail slots of the
    last page (whatever an earlier request left there), so two pools compare by content alone.
    """
    pages = torch.as_tensor(list(page_ids), dtype=torch.int64, device=kv.device)
    return kv[:, :, pages].flatten(2, 3)[:, :, :num_tokens].clone()


@dataclass(frozen=True)
class Generation:
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]  # the first token included; ends with the EOS id when it stopped there
    finish_reason: str  # "stop" (an EOS id) | "length" (max_new_tokens or the model's max_seq_len)
    prompt_kv: torch.Tensor  # [L, 2, len(prompt), Hkv, D]: what prefill wrote, what a transfer must deliver
    sequence_kv: torch.Tensor  # [L, 2, len(prompt) + len(output) - 1, Hkv, D]: every K/V written
    page_ids: tuple[int, ...]  # the pages the sequence used, in order


def colocated_generate(engine: Engine, prompt_ids: Sequence[int], max_new_tokens: int,
                       sampling: SamplingParams = GREEDY, *, stop_on_eos: bool = True,
                       page_seed: int | None = 0, device: torch.device | str | None = None) -> Generation:
    """Prefill then decode one sequence on one engine, allocating pages as the sequence grows.

    Pages come from a private pool in an order shuffled by `page_seed` (None: 0, 1, 2, ...), so the
    page table is not contiguous, as in a busy pool.
    """
    if max_new_tokens < 1:
        raise InvalidArgument("max_new_tokens must be >= 1", reason=Reason.INVALID_ARGUMENT)
    size = engine.layout.page_size
    limit = min(len(prompt_ids) + max_new_tokens, engine.max_seq_len)
    num_pages = max(1, engine.layout.pages_for_tokens(limit))
    free = list(range(num_pages))
    if page_seed is not None:
        random.Random(page_seed).shuffle(free)
    kv = empty_kv_pool(engine, num_pages, device or getattr(engine, "device", "cpu"))
    pages = [free.pop() for _ in range(engine.layout.pages_for_tokens(len(prompt_ids)))]
    out = [engine.prefill(prompt_ids, kv, pages, sampling)]
    prompt_kv = kv_by_token(kv, pages, len(prompt_ids))
    eos = engine.tokenizer.eos_ids if stop_on_eos else frozenset()
    while out[-1] not in eos and len(out) < max_new_tokens and len(prompt_ids) + len(out) < limit:
        position = len(prompt_ids) + len(out) - 1  # of the token we feed back
        if position % size == 0 and position // size == len(pages):
            pages.append(free.pop())
        out += engine.decode_step(kv, [DecodeItem(out[-1], position, tuple(pages), sampling)])
    reason = "stop" if out[-1] in eos else "length"
    sequence_kv = kv_by_token(kv, pages, len(prompt_ids) + len(out) - 1)
    return Generation(tuple(prompt_ids), tuple(out), reason, prompt_kv, sequence_kv, tuple(pages))


def time_colocated_prefill(engine: Engine, prompt_ids: Sequence[int], repeats: int = 5,
                           warmup: int = 1) -> list[float]:
    """Seconds per prefill (prompt KV plus the first token): a colocated engine's TTFT, no queueing."""
    device = getattr(engine, "device", torch.device("cpu"))
    kv = empty_kv_pool(engine, engine.layout.pages_for_tokens(len(prompt_ids)), device)
    pages = list(range(kv.shape[2]))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        engine.prefill(prompt_ids, kv, pages)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times
