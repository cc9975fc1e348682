"""Everything one DP rank process owns, in one place: engine, pages, transfer, bootstrap client.

Also tracks the rooms the rank is working on (so `AbortRoom` can cancel them and status can count
them) and serves the rank's `InstanceService` (abort, status, drain) for its controller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from contextlib import contextmanager
from typing import Iterator

from pdmesh import metrics
from pdmesh.config import INSTANCE_ROLES
from pdmesh.errors import Aborted, AlreadyExists
from pdmesh.grpcutil import translate_errors
from pdmesh.reasons import Reason
from pdmesh.worker.config import RankConfig
from pdmesh.worker.rank.pages import EngineThread, PageBroker
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

EARLY_ABORT_TTL_S = 120.0
MAX_EARLY_ABORTS = 65536


class RankState:
    def gauge_samples(self):
        """Live gauges for /metrics: free and total pool pages, rooms being worked on."""
        role = self.config.instance.role
        pool = self.pages.pool
        yield "pdmesh_kv_pages_free", (role,), pool.num_free
        yield "pdmesh_kv_pages_total", (role,), pool.num_pages
        yield "pdmesh_rank_active_requests", (role,), len(self.rooms)

    def __init__(self, config: RankConfig, engine, pages: PageBroker, transfer, bootstrap) -> None:
        self.config = config
        self.engine = engine
        self.layout = engine.layout
        self.pages = pages
        self.transfer = transfer
        self.bootstrap = bootstrap  # BootstrapClient of the instance's service (prefill) or None
        self.engine_thread = EngineThread()
        self.dp_rank = config.dp_rank
        self.dp_size = config.instance.dp_size
        self.instance_id = config.instance.instance_id
        self.epoch = config.epoch
        self.rooms: dict[int, asyncio.Task] = {}
        self._aborted: dict[int, str] = {}
        # Aborts that arrived before their room did (the router aborts both sides at once; the
        # request may still be on its way): the room fails at once when it comes. Bounded.
        self._early_aborts: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self.paths: Counter = Counter()
        self.draining = False

    @contextmanager
    def track(self, room: int) -> Iterator[None]:
        """Mark `room` as worked on by the current task (one task per room on a rank)."""
        if room in self.rooms:
            raise AlreadyExists(f"room {room} is already being served by {self.config.instance.role} "
                                f"rank {self.dp_rank}; rooms must be unique per request",
                                reason=Reason.ROOM_IN_USE, metadata={"bootstrap_room": room})
        early = self._early_aborts.pop(room, None)
        if early is not None and early[1] > time.monotonic():
            raise self._aborted_error(room, early[0])
        self.rooms[room] = asyncio.current_task()
        try:
            yield
        except asyncio.CancelledError:
            why = self._aborted.pop(room, None)
            if why is None:
                raise
            asyncio.current_task().uncancel()
            raise self._aborted_error(room, why) from None
        finally:
            self.rooms.pop(room, None)
            self._aborted.pop(room, None)

    def metrics_path(self, path: int) -> None:
        self.paths[path] += 1
        metrics.RANK_REQUESTS.labels(self.config.instance.role, metrics.path_name(path)).inc()

    def _aborted_error(self, room: int, why: str) -> Aborted:
        return Aborted(f"room {room} was aborted on {self.config.instance.role} rank "
                       f"{self.dp_rank}: {why}", reason=Reason.ROOM_ABORTED,
                       metadata={"bootstrap_room": room, "dp_rank": self.dp_rank})

    def abort(self, room: int, reason: str) -> bool:
        task = self.rooms.get(room)
        if task is None:
            self._early_aborts[room] = (reason, time.monotonic() + EARLY_ABORT_TTL_S)
            while len(self._early_aborts) > MAX_EARLY_ABORTS:
                self._early_aborts.popitem(last=False)
            return False
        log.info("abort room=%d rank=%d: %s", room, self.dp_rank, reason)
        self._aborted[room] = reason
        task.cancel(f"aborted: {reason}")
        return True


class RankInstanceService(worker_pb2_grpc.InstanceServiceServicer):
    """The rank's admin endpoint, called by its controller."""

    def __init__(self, state: RankState, extra_abort=None) -> None:
        self.state = state
        self._extra_abort = extra_abort

    @translate_errors
    async def AbortRoom(self, request, context) -> worker_pb2.AbortRoomResponse:
        found = self.state.abort(request.bootstrap_room, request.reason or "AbortRoom")
        if self._extra_abort is not None:
            found = self._extra_abort(request.bootstrap_room, request.reason) or found
        return worker_pb2.AbortRoomResponse(found=found)

    @translate_errors
    async def GetInstanceStatus(self, request, context) -> worker_pb2.GetInstanceStatusResponse:
        st = self.state
        rank = worker_pb2.RankStatus(dp_rank=st.dp_rank, alive=True, active_requests=len(st.rooms),
                                     free_pages=st.pages.pool.num_free, total_pages=st.pages.num_pages)
        return worker_pb2.GetInstanceStatusResponse(instance_id=st.instance_id, epoch=st.epoch,
                                                    ranks=[rank], draining=st.draining,
                                                    dp_size=st.dp_size,
                                                    role=INSTANCE_ROLES[st.config.instance.role])

    @translate_errors
    async def Drain(self, request, context) -> worker_pb2.DrainResponse:
        self.state.draining = True
        return worker_pb2.DrainResponse(active_requests=len(self.state.rooms))
