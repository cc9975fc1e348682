"""The KV layout descriptor that two sides compare at handshake.

A rank's pool is ONE tensor `kv` of shape [num_layers, 2, num_pages, page_size, num_kv_heads,
head_dim] (index 0 of the second axis is K, 1 is V), so every layer's K and V are views of it and
pack/unpack can address all layers in one call or one kernel launch.

Staging order (fixed, see DESIGN.md): for each layer, K pages then V pages, pages in the request's
order; i.e. a staging buffer for layers [a, b) and pages `ids` is `kv[a:b, :, ids]` made contiguous,
shape [b - a, 2, len(ids), page_size, num_kv_heads, head_dim]. Chunks of a transfer are ranges of
layers, so concatenating chunks in order gives the whole request's staging buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdmesh.common.v1 import common_pb2
from pdmesh.errors import InvalidArgument, LayoutMismatch
from pdmesh.reasons import Reason

DTYPES = {
    torch.bfloat16: common_pb2.KV_DTYPE_BF16,
    torch.float16: common_pb2.KV_DTYPE_FP16,
    torch.float32: common_pb2.KV_DTYPE_FP32,
    torch.float64: common_pb2.KV_DTYPE_FP64,
}
DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
               "fp64": torch.float64}
_FROM_PROTO = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class KvLayout:
    """Geometry of a paged KV pool; equal layouts are required on both sides of a transfer."""

    num_layers: int
    page_size: int  # tokens per page
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "page_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value > 1 << 20:
                raise InvalidArgument(f"KV layout {name} must be an integer in 1..2^20, got {value!r}",
                                      reason=Reason.INVALID_KV_LAYOUT, metadata={name: value})
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"KV dtype {self.dtype} is not one of bf16, fp16, fp32, fp64",
                                  reason=Reason.INVALID_KV_LAYOUT)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def page_bytes_per_layer(self) -> int:
        """Bytes of one page of K (or of V) in one layer."""
        return self.page_size * self.num_kv_heads * self.head_dim * self.itemsize

    def request_bytes(self, num_pages: int) -> int:
        """Bytes of a whole request's staging buffer: every layer, K and V."""
        return self.num_layers * 2 * num_pages * self.page_bytes_per_layer

    def pages_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def to_proto(self) -> common_pb2.KvLayout:
        return common_pb2.KvLayout(num_layers=self.num_layers, page_size=self.page_size,
                                   num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                   dtype=DTYPES[self.dtype])

    @classmethod
    def from_proto(cls, msg: common_pb2.KvLayout) -> "KvLayout":
        if msg.dtype not in _FROM_PROTO:
            raise InvalidArgument(f"KV dtype {msg.dtype} is unknown", reason=Reason.INVALID_KV_LAYOUT)
        return cls(msg.num_layers, msg.page_size, msg.num_kv_heads, msg.head_dim,
                   _FROM_PROTO[msg.dtype])

    def check_compatible(self, other: "KvLayout") -> None:
        """Raise FAILED_PRECONDITION (KV_LAYOUT_MISMATCH) naming every field that differs."""
        diffs = {f: (getattr(self, f), getattr(other, f))
                 for f in ("num_layers", "page_size", "num_kv_heads", "head_dim", "dtype")
                 if getattr(self, f) != getattr(other, f)}
        if diffs:
            raise LayoutMismatch(
                "KV layouts differ between the two sides: "
                + ", ".join(f"{k} {a} != {b}" for k, (a, b) in diffs.items())
                + "; run prefill and decode with the same model and KV settings",
                metadata={k: f"{a}!={b}" for k, (a, b) in diffs.items()})
