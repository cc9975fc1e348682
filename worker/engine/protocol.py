"""The contract between the worker and its model engine.

The rest of the worker (prefill and decode ranks, the colocated reference) depends only on what is
here, so another engine (a GPU engine, a real serving backend) can take the place of
`pdmesh.worker.engine.engine.TorchEngine` by implementing `Engine`.

Lifecycle of one sequence, as the worker drives it:

1. `tokenizer.encode(text)` gives the prompt ids (with BOS where the tokenizer adds one).
2. The caller allocates `layout.pages_for_tokens(len(prompt))` pages of its pool tensor `kv`
   (shape `[num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]`, see
   `pdmesh.worker.kv.layout`) and calls `prefill(prompt, kv, page_ids)`: prompt token i's K/V land
   in page `page_ids[i // page_size]`, slot `i % page_size`, of every layer; the result is the
   first output token (position `len(prompt)`).
3. Each decode step feeds the last token back as a `DecodeItem(token_id, position, page_ids)`:
   `position` is that token's index in the sequence (= the number of tokens whose K/V are already
   in the pool), and `page_ids` must cover `position + 1` tokens, so the caller allocates a new
   page whenever `position % page_size == 0`. The engine writes the token's K/V into its slot,
   attends over positions `0..position` through the page table, and returns the next token.
4. The caller stops at an EOS id (`tokenizer.eos_ids`) or its token budget and frees the pages.

Engines are not thread-safe: one rank calls one engine from one thread at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from pdmesh.errors import InvalidArgument
from pdmesh.reasons import Reason
from pdmesh.worker.kv.layout import KvLayout


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. `encode` adds the BOS token where the model expects one."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int:
        """The main end-of-sequence id (the first of `eos_ids`)."""
        ...

    @property
    def eos_ids(self) -> frozenset[int]:
        """Every id that ends a sequence (Llama 3 has several)."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens left out."""
        ...


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. `temperature == 0` is greedy (argmax, first index on ties).

    Random sampling is a pure function of (logits, params, position): the draw for the token at
    sequence position p uses a generator seeded from (seed, p), so a prefill on one process and the
    decode on another sample exactly what one colocated engine would, with no generator state to
    ship along.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {self.temperature}",
                                  reason=Reason.INVALID_SAMPLING_PARAMS,
                                  metadata={"temperature": self.temperature})
        if not (0 < self.top_p <= 1):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}",
                                  reason=Reason.INVALID_SAMPLING_PARAMS, metadata={"top_p": self.top_p})
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {self.top_k}",
                                  reason=Reason.INVALID_SAMPLING_PARAMS, metadata={"top_k": self.top_k})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


GREEDY = SamplingParams()


@dataclass(frozen=True)
class DecodeItem:
    """One sequence's input to a decode step (see the module docstring for `position`)."""

    token_id: int
    position: int
    page_ids: Sequence[int]
    sampling: SamplingParams = field(default=GREEDY)


@runtime_checkable
class Engine(Protocol):
    """A model that computes KV into a paged pool and picks tokens.

    Errors: bad input (ids outside the vocabulary, a page table too short or out of range, a
    sequence longer than `max_seq_len`, a pool tensor of another layout) raises
    `pdmesh.errors.InvalidArgument` before anything is written.
    """

    @property
    def layout(self) -> KvLayout:
        """Geometry of the pool tensors this engine reads and writes."""
        ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def max_seq_len(self) -> int:
        """Most tokens (prompt plus output) one sequence may hold."""
        ...

    def prefill(self, token_ids: Sequence[int], kv: torch.Tensor, page_ids: Sequence[int],
                sampling: SamplingParams = GREEDY,
                on_layer: Callable[[int], None] | None = None) -> int:
        """Write the prompt's K/V into `page_ids` of `kv`; return the first output token.

        `on_layer(i)`, if given, is called on the calling (engine) thread once for every layer i
        in order, as soon as layer i's K/V writes into the pages are issued: nothing writes
        them again during this call. On the CPU they are then in memory; on a GPU they are
        queued on the current stream, so a consumer waits on an event recorded there at that
        moment (the worker's layer streaming does this, `pdmesh.worker.rank.layer_stream`). Bad input
        raises before the first call. The worker streams layer i's KV to the decode while later
        layers compute."""
        ...

    def decode_step(self, kv: torch.Tensor, batch: Sequence[DecodeItem]) -> list[int]:
        """Advance every sequence of `batch` by one token; return the new tokens in batch order."""
        ...
