"""How a DP controller picks the rank that takes a request (pure logic, no I/O).

A pinned rank (`routed_dp_rank`) wins; otherwise the instance's load-balance method decides:
round_robin, shortest_queue (fewest active requests; ties go round robin), or
follow_bootstrap_room (`room % dp_size`, which a decode can infer without a lookup).

Where the method leaves a choice (round_robin, shortest_queue), a rank that is restarting (`alive`
false) is passed over while another one is up, so requests don't wait for it; a pinned or
room-implied rank is taken even then (its number carries meaning; the controller waits briefly for
it, then answers UNAVAILABLE).
"""

from __future__ import annotations

from typing import Sequence

from pdmesh.errors import InvalidArgument
from pdmesh.rules import validate_dp_rank

ROUND_ROBIN, SHORTEST_QUEUE, FOLLOW_BOOTSTRAP_ROOM = "round_robin", "shortest_queue", "follow_bootstrap_room"
METHODS = (ROUND_ROBIN, SHORTEST_QUEUE, FOLLOW_BOOTSTRAP_ROOM)


class Dispatcher:
    """Picks a DP rank for each request of one instance."""

    def __init__(self, dp_size: int, method: str) -> None:
        if method not in METHODS:
            raise InvalidArgument(f"unknown load-balance method {method!r}; choose one of {', '.join(METHODS)}")
        self.dp_size = dp_size
        self.method = method
        self._next = 0

    def pick(self, room: int, routed_dp_rank: int | None, loads: Sequence[int],
             alive: Sequence[bool] | None = None) -> int:
        """The rank for `room`; `loads[r]` is rank r's number of active requests, `alive[r]` whether
        its process is up (default: all are)."""
        if routed_dp_rank is not None:
            return validate_dp_rank(routed_dp_rank, self.dp_size, field="routed_dp_rank")
        if self.method == FOLLOW_BOOTSTRAP_ROOM:
            return room % self.dp_size
        start = self._next
        self._next = (self._next + 1) % self.dp_size
        order = [(start + i) % self.dp_size for i in range(self.dp_size)]
        if alive is not None and any(alive):
            order = [r for r in order if alive[r]]
        if self.method == ROUND_ROBIN:
            return order[0]
        return min(order, key=lambda r: loads[r])
