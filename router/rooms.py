"""Drawing bootstrap rooms: random 63-bit, never 0, one per request and per sample.

With `align_to_rank`, the room is drawn so that `room % dp_size` equals the pinned rank, which lets
a follow_bootstrap_room prefill take the pinned rank on its fast path (no conflict, no lookup).
"""

from __future__ import annotations

import secrets

from pdmesh.rules import MAX_ROOM


def draw_room(dp_size: int = 1, align_to_rank: int | None = None) -> int:
    """A fresh room in 1 .. 2^63-1; congruent to `align_to_rank` mod `dp_size` when given."""
    while True:
        room = secrets.randbits(63)
        if align_to_rank is not None and dp_size > 1:
            room -= room % dp_size
            room += align_to_rank
            if room > MAX_ROOM:
                continue
        if room:
            return room


def draw_token() -> bytes:
    """The per-transfer secret both sides get over the control path."""
    return secrets.token_bytes(16)
