"""What travels on a transfer link: control messages, chunk tags, the chunk plan, the checksum.

Control messages are `pdmesh.transfer.v1.TransferMessage` protobufs (protos/pdmesh/transfer/v1).
Failures travel as a `google.rpc.Status` (code, message, ErrorInfo with reason and metadata), as
on a gRPC call, and come back as the same `PdmeshError` class on the other side.

A request's staging buffer (layout.py) is cut into chunks of `layers_per_chunk` layers; chunk i
travels as one tagged message with tag `chunk_tag(transfer_id, i)`.

The checksum is pdmesh's block checksum, chosen for speed (it runs at memory bandwidth, ~28 GB/s
on one core here, where zlib.crc32 does 4 GB/s and would cost more than the wire): the bytes are
read as little-endian 64-bit words in 4 KiB blocks; each block's words are summed (mod 2^64) and
the block sums are combined with odd weights that differ by position (`combine`), so any change
of one block's sum (a changed word, any bit of it), a lost or extra block and most reorderings of
blocks (or page pieces) change the result; the chunk checksums are then folded in chunk order.
It guards against transport and bookkeeping faults, not against an adversary (the per-transfer
token does that part).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from google.rpc import status_pb2

from pdmesh.errors import DataLoss, Internal, PdmeshError
from pdmesh.reasons import Reason
from pdmesh.transfer.v1 import transfer_pb2
from pdmesh.worker.kv.layout import KvLayout

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_FNV_PRIME = 0x100000001B3
BLOCK_WORDS = 512


def encode(message: transfer_pb2.TransferMessage) -> bytes:
    return message.SerializeToString()


def decode(data: bytes) -> transfer_pb2.TransferMessage:
    message = transfer_pb2.TransferMessage()
    try:
        message.ParseFromString(bytes(data))
    except Exception as err:  # a peer speaking something else
        raise DataLoss(f"undecodable transfer control message ({len(data)} bytes): {err}",
                       reason=Reason.KV_TRANSFER_BAD_MESSAGE) from None
    if message.WhichOneof("body") is None:
        raise DataLoss("empty transfer control message", reason=Reason.KV_TRANSFER_BAD_MESSAGE)
    return message


def unexpected(error: Exception, what: str) -> PdmeshError:
    """A non-typed error (a bug) met by `what` ("the KV sender of room 7", ...), as the
    transfer's typed failure: that side fails and winds the transfer down at once (abort, pages
    untouched afterwards), so neither side waits for its state's bound; logged with its
    traceback here."""
    logging.getLogger(__name__).error("%s failed unexpectedly", what, exc_info=error)
    return Internal(f"{what} failed: {type(error).__name__}: {error}", reason=Reason.INTERNAL)


def failure_to_proto(error: PdmeshError) -> status_pb2.Status:
    """A failure as it travels on the link: the `google.rpc.Status` a gRPC call would carry."""
    return error.to_status_proto()


def failure_from_proto(status: status_pb2.Status) -> PdmeshError:
    """The typed error a link message's `google.rpc.Status` carries (the one place that decodes it)."""
    return PdmeshError.from_status_proto(status)


def chunk_tag(transfer_id: int, index: int) -> int:
    """The tag of chunk `index` of a transfer (63 bits; ucxx mixes in the endpoint's own tag)."""
    return ((transfer_id ^ ((index + 1) * _GOLDEN)) & MASK64) >> 1


@dataclass(frozen=True)
class ChunkPlan:
    """How a request's staging buffer is cut: chunk i holds layers `ranges[i]`."""

    layout: KvLayout
    num_pages: int
    layers_per_chunk: int

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer of the request (K and V)."""
        return 2 * self.num_pages * self.layout.page_bytes_per_layer

    @property
    def ranges(self) -> list[tuple[int, int]]:
        k, n = self.layers_per_chunk, self.layout.num_layers
        return [(a, min(a + k, n)) for a in range(0, n, k)]

    @property
    def num_chunks(self) -> int:
        return len(self.ranges)

    @property
    def total_bytes(self) -> int:
        return self.layout.request_bytes(self.num_pages)

    @property
    def max_chunk_bytes(self) -> int:
        return min(self.layers_per_chunk, self.layout.num_layers) * self.layer_bytes

    def chunk_bytes(self, index: int) -> int:
        a, b = self.ranges[index]
        return (b - a) * self.layer_bytes

    @staticmethod
    def layers_for(layout: KvLayout, num_pages: int, target_bytes: int, min_chunks: int = 1) -> int:
        """Layers per chunk so a chunk is about `target_bytes` (at least one layer), and a
        request has at least `min_chunks` chunks where it has that many layers (with layer
        streaming a chunk leaves once its last layer is computed: smaller ones leave sooner)."""
        per_layer = 2 * num_pages * layout.page_bytes_per_layer
        n = layout.num_layers
        by_count = max(1, -(-n // max(1, min_chunks)))
        if per_layer == 0:
            return by_count
        return max(1, min(n, by_count, target_bytes // per_layer))


def checksum(data: torch.Tensor) -> int:
    """Block checksum of a contiguous uint8 CPU or CUDA tensor (see the module docstring)."""
    flat = data.reshape(-1)
    if flat.storage_offset() % 8:  # word views need 8-byte alignment (staging buffers have it)
        flat = flat.clone()
    n = flat.numel()
    words = n // 8
    full = words // BLOCK_WORDS
    parts = []
    if full:
        body = flat[: full * BLOCK_WORDS * 8].view(torch.int64).view(full, BLOCK_WORDS)
        parts.append(body.sum(dim=1))
    if words > full * BLOCK_WORDS:
        rest = flat[full * BLOCK_WORDS * 8: words * 8].view(torch.int64)
        parts.append(rest.sum().reshape(1))
    if n > words * 8:
        tail = int.from_bytes(bytes(flat[words * 8:].cpu().tolist()), "little")
        parts.append(torch.tensor([tail], dtype=torch.int64, device=flat.device))
    if not parts:
        return n & MASK64
    sums = torch.cat(parts)
    weights = torch.arange(1, sums.numel() + 1, dtype=torch.int64, device=sums.device)
    return combine(int(sums.sum()), int((sums * weights).sum()), n)


def combine(total: int, positional: int, n: int) -> int:
    """A message's checksum from its block sums' total and positional sum (block i, from 0,
    weighted i + 1) and its length: block i counts 1 + 2 (i + 1) G times, an odd number, so a
    change of any one block's sum, any bit of it, changes the value. (With 1 + (i + 1) G, even
    for every other block since G is odd, flipping a word's top bit there went unseen.)"""
    return ((total & MASK64) + 2 * (positional & MASK64) * _GOLDEN + n) & MASK64


def fold(acc: int, chunk_checksum: int) -> int:
    """Fold a chunk checksum into the running transfer checksum (order matters)."""
    return ((acc ^ chunk_checksum) * _FNV_PRIME) & MASK64


FOLD_START = 0xCBF29CE484222325


async def send_trailer(link, status, transfer_id: int, offer, byte_count: int, checksum: int) -> None:
    """The last message of a transfer whose bytes all went out (first token, byte count, checksum,
    token; the receiver checks every one), then the transfer succeeds; both paths end this way."""
    trailer = transfer_pb2.TransferTrailer(transfer_id=transfer_id, first_token=offer.first_token,
                                           byte_count=byte_count, checksum=checksum, token=offer.token)
    await status.guard(link.send_control(encode(transfer_pb2.TransferMessage(trailer=trailer))))
    status.succeed()
