"""`TorchEngine`: the `Engine` protocol on the Llama-style torch model, with input checks.

Exactness (what the end-to-end tests rely on). With `batch_invariant` on (the `tiny` preset), a
decode step runs each sequence of the batch through the model on its own: the same operations on
tensors of the same shapes, in the same order, as when that sequence is decoded alone, so its K/V
and logits are bit-identical whatever else is in the batch (summation order inside a matrix
product can change with the number of rows; here the number of rows is always one). Prefill has
one sequence per call, so it is invariant by construction. Both sides of a PD pair and a colocated
engine therefore compute the same bits, provided they run the same build with the same number of
torch threads (the tests pin PDMESH_TORCH_THREADS=1). The `tiny` preset also runs in float64, a
second line of defence: were some kernel to reorder a sum anyway, the change would be ~1e-16
relative, far below the gap between the top two logits of all but vanishingly rare positions.
With `batch_invariant` off, linear layers process the whole batch at once (faster, not exact).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from pdmesh.errors import InvalidArgument
from pdmesh.reasons import Reason
from pdmesh.worker.engine.config import ModelConfig
from pdmesh.worker.engine.model import Model
from pdmesh.worker.engine.protocol import GREEDY, DecodeItem, SamplingParams, Tokenizer
from pdmesh.worker.engine.sampling import sample
from pdmesh.worker.engine.weights import Weights
from pdmesh.worker.kv.layout import KvLayout


# One checked decode item: (token id, position, flat write slot, flat read slots [position + 1]).
_Row = tuple[int, int, int, torch.Tensor]


def _resolve(device: torch.device) -> torch.device:
    """`cuda` -> `cuda:<current>`, so it compares equal to the device of the tensors made on it."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _bad(message: str, reason: str, **metadata: object) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, metadata=metadata)


class TorchEngine:
    """A Llama-style decoder in torch that reads and writes a paged KV pool (see protocol.py)."""

    def __init__(self, cfg: ModelConfig, weights: Weights, tokenizer: Tokenizer,
                 device: torch.device | str = "cpu") -> None:
        if tokenizer.vocab_size > cfg.vocab_size:
            raise _bad(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                       f"{cfg.vocab_size}", Reason.INVALID_MODEL_CONFIG)
        self.config = cfg
        self.device = _resolve(torch.device(device))
        self.model = Model(cfg, weights, self.device)
        self._tokenizer = tokenizer
        self._layout = cfg.layout

    @property
    def layout(self) -> KvLayout:
        return self._layout

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def new_kv_pool(self, num_pages: int) -> torch.Tensor:
        """A zeroed pool tensor of this engine's layout on its device (for tests and references)."""
        lay = self._layout
        return torch.zeros((lay.num_layers, 2, num_pages, lay.page_size, lay.num_kv_heads, lay.head_dim),
                           dtype=lay.dtype, device=self.device)

    # -- the Engine protocol ------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, token_ids: Sequence[int], kv: torch.Tensor, page_ids: Sequence[int],
                sampling: SamplingParams = GREEDY,
                on_layer: Callable[[int], None] | None = None) -> int:
        hidden = self._prefill_hidden(token_ids, kv, page_ids, on_layer)
        logits = self.model.logits(hidden[-1:])[0]  # only the last position is needed
        return sample(logits, sampling, len(token_ids))

    @torch.inference_mode()
    def decode_step(self, kv: torch.Tensor, batch: Sequence[DecodeItem]) -> list[int]:
        logits = self.decode_logits(kv, batch)
        return [sample(logits[i], item.sampling, item.position + 1) for i, item in enumerate(batch)]

    # -- logits, for tests and for callers that sample themselves ------------------------------

    @torch.inference_mode()
    def prefill_logits(self, token_ids: Sequence[int], kv: torch.Tensor,
                       page_ids: Sequence[int]) -> torch.Tensor:
        """Like `prefill`, but return the logits [T, vocab] of every prompt position."""
        return self.model.logits(self._prefill_hidden(token_ids, kv, page_ids))

    @torch.inference_mode()
    def decode_logits(self, kv: torch.Tensor, batch: Sequence[DecodeItem]) -> torch.Tensor:
        """Like `decode_step`, but return the logits [B, vocab] of the batch's next tokens."""
        self._check_pool(kv)
        if not batch:
            return torch.empty((0, self.config.vocab_size), dtype=self.config.dtype, device=self.device)
        rows = [self._decode_row(item, kv.shape[2]) for item in batch]
        writes = [int(r[2]) for r in rows]
        if len(set(writes)) != len(writes):
            raise _bad("two sequences of the decode batch would write the same page slot; each "
                       "sequence needs pages of its own", Reason.INVALID_PAGE_TABLE)
        groups = [[row] for row in rows] if self.config.batch_invariant else [rows]
        return torch.cat([self._decode_group(kv, group) for group in groups])

    # -- internals ----------------------------------------------------------------------------

    def _decode_group(self, kv: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        ids, positions, writes, reads = zip(*rows)
        hidden = self.model.decode(kv, self._ints(ids), self._ints(positions), self._ints(writes),
                                   list(reads))
        return self.model.logits(hidden)

    def _ints(self, values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _prefill_hidden(self, token_ids: Sequence[int], kv: torch.Tensor, page_ids: Sequence[int],
                        on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        self._check_pool(kv)
        n = len(token_ids)
        if n == 0:
            raise _bad("the prompt is empty", Reason.INVALID_PROMPT)
        if n >= self.max_seq_len:
            raise _bad(f"the prompt has {n} tokens; this model holds at most {self.max_seq_len} per "
                       "sequence, prompt and output together", Reason.SEQUENCE_TOO_LONG,
                       prompt_tokens=n, max_seq_len=self.max_seq_len)
        ids = self._check_tokens(token_ids)
        slots = self._slots(page_ids, n, kv.shape[2]).to(self.device)
        return self.model.prefill(kv, ids, slots, on_layer)

    def _decode_row(self, item: DecodeItem, num_pages: int) -> _Row:
        """(token, position, write slot, read slots [position + 1]) of one decode item, checked."""
        pos = item.position
        if not isinstance(pos, int) or not 0 <= pos < self.max_seq_len:
            raise _bad(f"decode position {pos!r} is outside 0..{self.max_seq_len - 1}",
                       Reason.SEQUENCE_TOO_LONG, position=pos, max_seq_len=self.max_seq_len)
        self._check_tokens([item.token_id])
        reads = self._slots(item.page_ids, pos + 1, num_pages)
        return item.token_id, pos, int(reads[-1]), reads.to(self.device)

    def _check_tokens(self, token_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(list(token_ids), dtype=torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise _bad(f"token ids must be in 0..{self.config.vocab_size - 1}", Reason.INVALID_TOKEN_ID,
                       min=int(ids.min()), max=int(ids.max()))
        return ids.to(self.device)

    def _slots(self, page_ids: Sequence[int], num_tokens: int, num_pages: int) -> torch.Tensor:
        """Flat pool slots [num_tokens] (on the CPU) of positions 0..num_tokens-1 through the page
        table, after checking it covers them with distinct pages of the pool."""
        size = self._layout.page_size
        need = self._layout.pages_for_tokens(num_tokens)
        pages = list(page_ids)
        if len(pages) < need:
            raise _bad(f"{num_tokens} tokens need {need} pages of {size} tokens, the page table "
                       f"has {len(pages)}", Reason.INVALID_PAGE_TABLE, need=need, have=len(pages))
        table = torch.as_tensor(pages[:need], dtype=torch.int64)
        if int(table.min()) < 0 or int(table.max()) >= num_pages or len(set(pages[:need])) != need:
            raise _bad(f"page ids must be distinct and in 0..{num_pages - 1}", Reason.INVALID_PAGE_TABLE,
                       min=int(table.min()), max=int(table.max()))
        return (table[:, None] * size + torch.arange(size)).flatten()[:num_tokens]

    def _check_pool(self, kv: torch.Tensor) -> None:
        lay = self._layout
        expected = (lay.num_layers, 2, lay.page_size, lay.num_kv_heads, lay.head_dim)
        shape = tuple(kv.shape)
        if (kv.dim() != 6 or shape[:2] + shape[3:] != expected or kv.dtype != lay.dtype
                or kv.device != self.device or not kv.is_contiguous()):
            raise _bad(f"the KV pool tensor must be contiguous [{lay.num_layers}, 2, pages, "
                       f"{lay.page_size}, {lay.num_kv_heads}, {lay.head_dim}] {lay.dtype} on "
                       f"{self.device}, got {list(shape)} {kv.dtype} on {kv.device}", Reason.KV_POOL_MISMATCH)
