"""The wire plan of one transfer: which bytes travel in which tagged message, in place or packed.

A pool is [num_layers, 2, num_pages, page_size, heads, head_dim] (kv/layout.py), so for one layer
and one of K/V, pages with consecutive ids are one contiguous block of memory. A request's pages
(in request order) fall into *runs*: request pages i..i+r-1 are pool pages p..p+r-1. Each side
describes its own pages as run lengths (`page_runs`) and they are exchanged before any byte moves
(the receiver's in its TransferRequest, the sender's in its OK TransferResponse), so both sides
build the same `WirePlan` from the same inputs:

- *common runs*: the request's pages cut at every run boundary of either side; each common run
  lies inside one run on both sides.
- *direct runs*: the common runs of at least `min_direct_bytes` per layer and K/V (the longest
  `max_direct_runs` of them): for every layer and K/V such a run is one contiguous block in both
  pools, sent from the sender's pool and received into the receiver's pool in place, one tagged
  message each: no pack, no unpack, no staging buffer.
- the other pages are *packed*: per chunk of layers [a, b), one message holding
  `kv[a:b, :, packed_ids]` in the staging order (layer, K then V, pages in request order), packed
  and unpacked as before.

Chunk c (layers `ranges[c]`) sends its direct messages (layer, K/V, run order) and then its packed
message; message k of the transfer has tag `wire.chunk_tag(transfer_id, k)`. A peer that sends no
runs has every page on its own: everything is packed, one message per chunk, which is the wire
format of pdmesh before runs existed. Run lengths from a peer are checked (INVALID_ARGUMENT from a
request, DATA_LOSS from a response): a plan never addresses a page outside the request.

The transfer checksum folds each message's block checksum (wire.checksum, computed by
`digest.py` without a host sync) in plan order; the trailer carries it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import NamedTuple

import numpy as np
import torch

from pdmesh.errors import DataLoss, InvalidArgument
from pdmesh.reasons import Reason
from pdmesh.worker.kv.layout import KvLayout
from pdmesh.worker.transfer import digest


def page_runs(page_ids: Sequence[int] | torch.Tensor | np.ndarray) -> list[int]:
    """Run lengths of `page_ids` in order: [3, 1] for pages 7, 8, 9, 2."""
    ids = np.asarray(page_ids.cpu() if isinstance(page_ids, torch.Tensor) else page_ids,
                     dtype=np.int64)
    if ids.size < 2:
        return [ids.size] if ids.size else []
    cuts = np.flatnonzero(ids[1:] - ids[:-1] != 1) + 1  # where a run ends and the next begins
    if not cuts.size:
        return [ids.size]
    bounds = np.empty(cuts.size + 2, dtype=np.int64)
    bounds[0], bounds[1:-1], bounds[-1] = 0, cuts, ids.size
    return (bounds[1:] - bounds[:-1]).tolist()


def on_wire(runs: list[int], num_pages: int) -> list[int]:
    """What a message carries for these runs: none where every page is its own run (the
    protocol's meaning of no runs), so scattered pages cost no list on the wire."""
    return [] if len(runs) == num_pages else runs


def checked_runs(runs: Sequence[int], num_pages: int, *, from_request: bool) -> list[int]:
    """A peer's run lengths, validated; none given means every page on its own."""
    if not len(runs):
        return [1] * num_pages
    lengths = np.array(runs, dtype=np.int64)  # a protobuf repeated field: no Python int each
    if lengths.min() < 1 or int(lengths.sum()) != num_pages:
        error = InvalidArgument if from_request else DataLoss
        raise error(f"page_runs must be positive lengths summing to the {num_pages} pages of the "
                    f"request, got {len(runs)} runs summing to {int(lengths.sum())}",
                    reason=Reason.INVALID_PAGE_RUNS if from_request else Reason.KV_TRANSFER_BAD_MESSAGE,
                    metadata={"num_pages": num_pages, "runs": len(runs)})
    return lengths.tolist()


class Message(NamedTuple):
    """One tagged message: a direct block (layer, half, pages [start, start + length) of the
    request) or the packed message of a chunk (layers [a, b), the plan's packed pages). A named
    tuple: a plan of one run makes 2 per layer, and a frozen dataclass cost 1 us each."""

    index: int
    chunk: int
    nbytes: int
    layer: int = -1  # -1: the packed message of the chunk
    half: int = 0  # 0 = K, 1 = V
    start: int = 0
    length: int = 0

    @property
    def direct(self) -> bool:
        return self.layer >= 0


@dataclass(frozen=True)
class WirePlan:
    layout: KvLayout
    num_pages: int
    layers_per_chunk: int
    direct: tuple[tuple[int, int], ...]  # (start, length) of each direct run, request order
    # request indices of the packed pages, in order (int64)
    packed: np.ndarray = field(compare=False)
    chunks: tuple[tuple[Message, ...], ...] = field(repr=False)

    @classmethod
    def build(cls, layout: KvLayout, num_pages: int, layers_per_chunk: int,
              recv_runs: Sequence[int], send_runs: Sequence[int], *,
              min_direct_bytes: int, max_direct_runs: int) -> "WirePlan":
        piece = layout.page_bytes_per_layer
        long = _direct_runs(num_pages, recv_runs, send_runs, piece, min_direct_bytes,
                            max_direct_runs)
        packed = _complement(num_pages, long)
        ranges = [(a, min(a + layers_per_chunk, layout.num_layers))
                  for a in range(0, layout.num_layers, layers_per_chunk)]
        chunks, k = [], 0
        for c, (a, b) in enumerate(ranges):
            msgs = []
            for layer in range(a, b):
                for half in (0, 1):
                    for start, length in long:
                        msgs.append(Message(k, c, length * piece, layer, half, start, length))
                        k += 1
            if packed.size or not long:  # (a request of no pages: one empty message, as before)
                msgs.append(Message(k, c, (b - a) * 2 * packed.size * piece))
                k += 1
            chunks.append(tuple(msgs))
        return cls(layout, num_pages, layers_per_chunk, tuple(long), packed, tuple(chunks))

    @property
    def ranges(self) -> list[tuple[int, int]]:
        n, k = self.layout.num_layers, self.layers_per_chunk
        return [(a, min(a + k, n)) for a in range(0, n, k)]

    @property
    def num_messages(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def total_bytes(self) -> int:
        return self.layout.request_bytes(self.num_pages)

    @property
    def max_message_bytes(self) -> int:
        return max((m.nbytes for c in self.chunks for m in c), default=0)

    @property
    def direct_pages(self) -> int:
        return sum(length for _, length in self.direct)


_FEW_RUNS = 64  # both sides' runs together, up to which _direct_runs loops in Python


def _direct_runs(num_pages: int, recv_runs: Sequence[int], send_runs: Sequence[int],
                 piece: int, min_bytes: int, max_runs: int) -> list[tuple[int, int]]:
    """(start, length) of the runs that travel in place, in request order: the common runs
    (the request cut at every run boundary of either side) of at least `min_bytes` per layer
    and K/V, the longest `max_runs` of them (the earlier one of equal lengths). Vectorised: a
    request of thousands of single pages costs no Python work per page; a few runs take the
    plain loop (numpy's cost per call is more than theirs)."""
    if max_runs <= 0:
        return []
    if len(recv_runs) + len(send_runs) <= _FEW_RUNS:
        cuts_set = set(accumulate(recv_runs, initial=0)) | set(accumulate(send_runs, initial=0))
        points = sorted(cuts_set)
        common = [(x, y - x) for x, y in zip(points, points[1:])]
        long = [run for run in common if run[1] * piece >= min_bytes]
        return sorted(sorted(long, key=lambda r: -r[1])[:max_runs])
    if num_pages in (len(recv_runs), len(send_runs)):  # a side of single pages: so are all
        cuts = np.arange(1, num_pages + 1)
    else:  # both ends of every run of either side, in order, once
        cuts = np.sort(np.concatenate([np.cumsum(recv_runs, dtype=np.int64),
                                       np.cumsum(send_runs, dtype=np.int64)]), kind="stable")
        cuts = cuts[np.diff(cuts, prepend=0) > 0]
    starts = np.concatenate(([0], cuts[:-1])) if cuts.size else cuts
    lengths = cuts - starts
    chosen = np.flatnonzero(lengths * piece >= min_bytes)
    if chosen.size > max_runs:
        chosen = np.sort(chosen[np.argsort(-lengths[chosen], kind="stable")[:max_runs]])
    return list(zip(starts[chosen].tolist(), lengths[chosen].tolist()))


def _complement(num_pages: int, runs: list[tuple[int, int]]) -> np.ndarray:
    if not runs:
        return np.arange(num_pages)
    keep = np.ones(num_pages, dtype=np.bool_)
    for start, length in runs:
        keep[start:start + length] = False
    return np.flatnonzero(keep)


class PoolSide:
    """One side's view of a plan: the pool tensors its messages read or fill.

    `block(m)` is a direct message's bytes in this side's pool (a contiguous uint8 view, made
    once per transfer: per-message tensor indexing cost more CPU than the message's rendezvous);
    `direct_parts(a, b)` the checksum parts of chunk [a, b)'s direct messages in plan order, one
    reduction per run; `packed_ids` the pool page ids of the packed pages (on the pool's device)
    for pack/unpack."""

    def __init__(self, plan: WirePlan, kv: torch.Tensor, host: np.ndarray) -> None:
        """`host`: the request's checked pool page ids, in request order (a host array: no
        tensor read on the transfer's path)."""
        from pdmesh.worker.kv.pack import ids_on

        self.plan, self.kv = plan, kv
        host = np.asarray(host, dtype=np.int64)
        firsts = host[[start for start, _ in plan.direct]].tolist()
        # per direct run: [layers, 2, run bytes] uint8, each row one message's block in the pool
        self._rows = [kv[:, :, first:first + length].flatten(2).view(torch.uint8)
                      for first, (_, length) in zip(firsts, plan.direct)]
        self._blocks = {start: rows.flatten(0, 1).unbind(0)  # row 2 * layer + half
                        for (start, _), rows in zip(plan.direct, self._rows)}
        self.packed_ids = ids_on(host[plan.packed], kv.device)

    def block(self, m: Message) -> torch.Tensor:
        return self._blocks[m.start][2 * m.layer + m.half]

    def direct_parts(self, a: int, b: int) -> torch.Tensor | None:
        """digest.parts of every direct message of layers [a, b), [k, 2] in plan order (layer,
        K/V, run); None when the plan has no direct runs."""
        if not self._rows:
            return None
        parts = [digest.rows_parts(rows[a:b]) for rows in self._rows]  # each [b - a, 2, 2]
        joined = parts[0] if len(parts) == 1 else torch.stack(parts, dim=2)
        return joined.reshape(-1, 2)


def run_histogram(runs: Sequence[int], edges: Sequence[int] = (1, 2, 4, 8, 16, 64)
                  ) -> dict[str, float]:
    """Share of pages in runs of each length class (`1`, `2-3`, ..., `64+`): for reports."""
    total = sum(runs) or 1
    labels = [f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])]
    labels.append(f"{edges[-1]}+")
    out = dict.fromkeys(labels, 0.0)
    for r in runs:
        out[labels[bisect.bisect_right(edges, r) - 1]] += r / total
    return out
