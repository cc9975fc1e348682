"""`PrefillService` on one prefill DP rank: the prefill rule, the prompt's KV, the hand-off.

For each room: check the request, apply the prefill rule (`pdmesh.rules.prefill_rule`: nothing to
register when hinted or on the fast path, register room -> rank at the bootstrap service, or fail
typed with the conflict), take pages (bounded wait), offer the pages
to the decode and compute the KV and the first token on the engine thread while each finished
layer streams out (`layer_stream.py`; with layer streaming off: compute, then offer), wait until
they are sent (bounded by `transfer_wait_s` from the offer and by the caller's deadline), then free them. The
answer says which rank path the room took and what it cost. A registered room is kept known to a
bootstrap service that restarts meanwhile (`room_keeper.RoomKeeper`) and removed from the
registry when the room ends, however it ends. A caller that goes away aborts the offer, and the
pages go back only once no UCX send or pack thread uses them (`kv_link.RankTransfer`).

The registration is off the request's critical path: it goes out first and is in flight while
the pages are taken and computed (`_beside`). A decode finds this rank only through the record,
so nothing is claimed before the record is durable; a registration that fails stops the compute
and is the request's typed error.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pdmesh import logs, metrics
from pdmesh.common.v1 import common_pb2
from pdmesh.config import DEFAULT_DEADLINE_S, LOAD_BALANCE_METHODS
from pdmesh.errors import PdmeshError, Unavailable
from pdmesh.grpcutil import translate_errors
from pdmesh.reasons import Reason
from pdmesh.rules import PrefillAction, optional_dp_rank, prefill_rule, validate_room
from pdmesh.worker.rank import requests
from pdmesh.worker.rank.layer_stream import prefill_streamed, wait_quietly
from pdmesh.worker.rank.rank_state import RankState
from pdmesh.worker.rank.room_keeper import RoomKeeper
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

_PATHS = {PrefillAction.NONE_HINTED: common_pb2.RANK_PATH_HINT,
          PrefillAction.REGISTER: common_pb2.RANK_PATH_LOOKUP,
          PrefillAction.FAST_PATH: common_pb2.RANK_PATH_FAST_PATH}


class PrefillRankService(worker_pb2_grpc.PrefillServiceServicer):
    def __init__(self, state: RankState) -> None:
        self.state = state
        inst = state.config.instance
        self.method = LOAD_BALANCE_METHODS[inst.load_balance_method]
        self.force_query = inst.force_query_prefill_dp_rank
        self._keeper: RoomKeeper | None = None

    def _path(self, action: PrefillAction) -> int:
        if action is PrefillAction.FAST_PATH and self.state.dp_size == 1:
            return common_pb2.RANK_PATH_DP1
        return _PATHS[action]

    @translate_errors
    async def Prefill(self, request: worker_pb2.PrefillRequest, context) -> worker_pb2.PrefillResponse:
        st = self.state
        room = validate_room(request.bootstrap_room)
        logs.bind(room=room, prefill_rank=st.dp_rank, instance=st.instance_id)
        token = requests.transfer_token(request.transfer_token)
        ids = requests.prompt_ids(st.engine, request.prompt)
        sampling = requests.sampling_params(request.sampling)
        hint = optional_dp_rank(request, "disagg_prefill_dp_rank")
        action = prefill_rule(st.dp_rank, st.dp_size, room, self.method, self.force_query, hint)
        logs.event(log, logging.DEBUG, "prefill start", action=action.value, prompt_tokens=len(ids))
        remaining = context.time_remaining()
        deadline = time.monotonic() + (remaining if remaining is not None else DEFAULT_DEADLINE_S)
        registration: asyncio.Task | None = None
        try:
            with st.track(room):
                st.transfer.expect_room(room, deadline)
                if action is PrefillAction.REGISTER:  # in flight while the pages are taken and computed
                    registration = asyncio.ensure_future(
                        self._register_kept(room, request.request_id or f"room-{room}"))
                pages = await st.pages.alloc_wait(st.layout.pages_for_tokens(len(ids)),
                                                  st.config.instance.page_wait_s)
                try:
                    started = time.perf_counter()
                    send = prefill_streamed if st.config.instance.layer_streaming else self._then_send
                    work = send(st, room, ids, pages, sampling, token, deadline)
                    first, computed, sent = await (work if registration is None else _beside(
                        registration, work, lambda err: st.transfer.sender.abort(room, err)))
                finally:
                    st.pages.free(pages)
        finally:
            if registration is not None:
                self._end_registration(room, registration)
        st.metrics_path(self._path(action))
        logs.event(log, logging.INFO, "prefill done", path=metrics.path_name(self._path(action)),
                   prompt_tokens=len(ids), compute_ms=round((computed - started) * 1e3, 2),
                   transfer_ms=round((sent - computed) * 1e3, 2))
        return worker_pb2.PrefillResponse(dp_rank=st.dp_rank, rank_path=self._path(action),
                                          first_token_id=first, prompt_tokens=len(ids),
                                          compute_ms=(computed - started) * 1e3,
                                          transfer_ms=(sent - computed) * 1e3)

    @staticmethod
    async def _then_send(st: RankState, room: int, ids, pages: list[int], sampling, token: bytes,
                         deadline: float) -> tuple[int, float, float]:
        """Without layer streaming: compute the whole prompt, then offer the pages."""
        first = await st.engine_thread.run(st.engine.prefill, ids, st.pages.kv, pages, sampling)
        computed = time.perf_counter()
        # the computed room waits for its decode `transfer_wait_s` at most, whatever the
        # caller's deadline: a decode that never comes costs that, not the deadline
        hold = min(deadline, time.monotonic() + st.config.instance.transfer_wait_s)
        await st.transfer.send_room(room=room, page_ids=pages, first_token=first, token=token,
                                    deadline=hold)
        return first, computed, time.perf_counter()

    async def _register(self, room: int, request_id: str) -> None:
        st = self.state
        try:
            # over the process's one registration stream: concurrent rooms go out together
            await st.bootstrap.register_room_streamed(st.instance_id, room, st.dp_rank, request_id)
        except PdmeshError as err:
            if err.code.name != "UNAVAILABLE":
                raise
            raise Unavailable(f"the bootstrap service at {st.bootstrap.address} cannot be reached to register "
                              f"room {room}: {err.message}", reason=Reason.BOOTSTRAP_UNAVAILABLE,
                              metadata={"bootstrap": st.bootstrap.address}) from None

    async def _register_kept(self, room: int, request_id: str) -> None:
        await self._register(room, request_id)
        self.keeper.add(room, request_id)

    def _end_registration(self, room: int, registration: asyncio.Task) -> None:
        """The record is not needed any more, whatever happened: forget it once it is made (a
        registration still in flight is left to end, bounded by the client's timeout)."""
        def forget(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is None:
                self.keeper.discard(room)
                self.state.bootstrap.remove_room_streamed(room)  # rides on the stream, unanswered
        if registration.done():
            forget(registration)
        else:
            registration.add_done_callback(forget)

    @property
    def keeper(self) -> RoomKeeper:
        """Registers this rank's waiting rooms again after the bootstrap service restarted."""
        if self._keeper is None:
            st = self.state
            self._keeper = RoomKeeper(st.bootstrap.channel, self._register, st.transfer.decode_asked)
        return self._keeper


async def _beside(registration: asyncio.Task, work, abort):
    """Run `work` (offer and compute the room) while its registration is in flight.

    No decode can claim the room before its record is durable: a decode finds this rank only
    through the record (the hinted and fast paths register nothing). A registration that fails
    stops the compute (cancelled: the engine thread is done with the pages when it returns) and
    its typed error is the request's, and the offer's (`abort(error)` first: a decode already
    fetching gets it, not a cancellation; a record can be durable at a bootstrap service that
    died before it answered); the registration's latency hides behind the compute. Work that
    ends first ends the request as it ended: failed, or sent (then a decode found the record).
    """
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait([registration, task], return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and registration.exception() is not None:
            if isinstance(registration.exception(), PdmeshError):
                abort(registration.exception())
            task.cancel()
        await asyncio.wait([task])
    except asyncio.CancelledError:  # the caller went away: stop the work, pages stay safe
        task.cancel()
        await wait_quietly(task)
        raise
    if registration.done() and not registration.cancelled() and registration.exception() is not None:
        await registration  # its error: it is why the compute stopped
    return task.result()
