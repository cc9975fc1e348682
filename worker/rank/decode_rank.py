"""`DecodeService` on one decode DP rank: resolve the prefill rank, fetch the KV, decode, stream.

For each room: check the request; read the prefill's instance info (cached by instance id,
refreshed when its epoch changes: `InstanceInfoCache`); resolve the prefill DP rank by the decode
rule (hint, dp1, fast path, or a lookup over the process's one lookup stream to that bootstrap
service); take pages for the prompt (bounded wait); fetch the KV over UCX from that rank's
transfer address; stream the first token, then join the continuous batch (`DecodeLoop`) and
stream each token as it comes. Pages go back when the sequence ends, fails or is aborted.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pdmesh import logs, metrics
from pdmesh.addresses import validate_address
from pdmesh.common.v1 import common_pb2
from pdmesh.config import DEFAULT_DEADLINE_S
from pdmesh.errors import (DeadlineExceeded, EpochMismatch, FailedPrecondition, InvalidArgument, NotFound,
                           PdmeshError, Unavailable)
from pdmesh.grpcutil import translate_errors
from pdmesh.reasons import Reason
from pdmesh.rules import decode_rule, optional_dp_rank, validate_room
from pdmesh.server.client import shared_client
from pdmesh.worker.rank import requests
from pdmesh.worker.rank.decode_loop import DecodeLoop, Sequence
from pdmesh.worker.rank.prelink import Prelinker
from pdmesh.worker.kv.layout import KvLayout
from pdmesh.worker.rank.rank_state import RankState
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

#: A fetch that failed this way never reached the rank: new instance info may name one that is up.
_UNREACHABLE = frozenset({Reason.KV_TRANSFER_PEER_UNREACHABLE, Reason.KV_TRANSFER_CONNECT_TIMEOUT})
#: ... or may have been lost on its link (closed as unresponsive): worth one more try on a new link.
_NEVER_REACHED = _UNREACHABLE | {Reason.KV_TRANSFER_NO_ANSWER}
#: Resolutions of one request: a policy change costs one more, a lost request one more.
_RESOLVES = 3

_PATHS = {"hint": common_pb2.RANK_PATH_HINT, "dp1": common_pb2.RANK_PATH_DP1,
          "fast_path": common_pb2.RANK_PATH_FAST_PATH, "lookup": common_pb2.RANK_PATH_LOOKUP}


class InstanceInfoCache:
    """Prefill instance info by instance id; `refresh` when a transfer reports a newer epoch."""

    def __init__(self, tls=None, on_info=None) -> None:
        self._infos: dict[tuple[str, str], object] = {}
        self._fetching: dict[tuple[str, str], asyncio.Future] = {}
        self._tls = tls  # the rank's TlsConfig for the bootstrap channel (None: plaintext)
        self.on_info = on_info or (lambda info: None)  # each fetched info (prelink.py)

    def put(self, bootstrap_address: str, info) -> None:
        """Cache `info` (from a list of the bootstrap's instances) unless a newer epoch is cached."""
        key = (bootstrap_address, info.instance_id)
        cached = self._infos.get(key)
        if cached is None or cached.epoch <= info.epoch:
            self._infos[key] = info

    async def get(self, bootstrap_address: str, instance_id: str, *, refresh: bool = False):
        """The cached info; the first request for an instance fetches it once for every request
        that arrives meanwhile (a burst must not storm the bootstrap service); `refresh` fetches
        anew."""
        key = (bootstrap_address, instance_id)
        if not refresh and key in self._infos:
            return self._infos[key]
        pending = None if refresh else self._fetching.get(key)
        if pending is None:
            pending = asyncio.ensure_future(
                shared_client(bootstrap_address, self._tls).get_instance(instance_id))
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
            if not refresh:
                self._fetching[key] = pending
                pending.add_done_callback(lambda _: self._fetching.pop(key, None))
        info = await asyncio.shield(pending)
        self._infos[key] = info
        self.on_info(info)
        return info


class DecodeRankService(worker_pb2_grpc.DecodeServiceServicer):
    def __init__(self, state: RankState, loop: DecodeLoop) -> None:
        self.state = state
        self.loop = loop
        self.infos = InstanceInfoCache(state.config.instance.tls)
        # the ranks of every prefill instance this rank learns of are linked ahead of requests
        self.prelinker = Prelinker(state.transfer, state.layout, self.infos, state.bootstrap)
        self.infos.on_info = self.prelinker.instance

    @translate_errors
    async def Decode(self, request: worker_pb2.DecodeRequest, context):
        st = self.state
        received = time.perf_counter()
        room = validate_room(request.bootstrap_room)
        logs.bind(room=room, decode_rank=st.dp_rank, instance=st.instance_id,
                  prefill_instance=request.prefill_instance_id)
        token = requests.transfer_token(request.transfer_token)
        ids = requests.prompt_ids(st.engine, request.prompt)
        budget = requests.max_new_tokens(st.engine, request.sampling, len(ids))
        sampling = requests.sampling_params(request.sampling)  # checked before any KV moves
        if not request.prefill_instance_id or not request.prefill_bootstrap_address:
            raise InvalidArgument("prefill_instance_id and prefill_bootstrap_address are required",
                                  reason=Reason.MISSING_PREFILL)
        validate_address(request.prefill_bootstrap_address, "prefill_bootstrap_address")
        remaining = context.time_remaining()
        deadline = time.monotonic() + (remaining if remaining is not None else DEFAULT_DEADLINE_S)
        hint = optional_dp_rank(request, "disagg_prefill_dp_rank")
        with st.track(room):
            info, prefill_rank, path = await self._resolve(request, room, hint, deadline)
            resolved = time.perf_counter()
            metrics.DECODE_RESOLVE_SECONDS.labels(path).observe(resolved - received)
            logs.bind(prefill_rank=prefill_rank, path=path)
            pages = await st.pages.alloc_wait(st.layout.pages_for_tokens(len(ids)),
                                              min(st.config.instance.page_wait_s, deadline - time.monotonic()))
            seq = None
            try:
                first, info, prefill_rank, path = await self._fetch(
                    request, info, prefill_rank, path, room, hint, pages, token, deadline)
                fetched = time.perf_counter()
                st.metrics_path(_PATHS[path])
                if st.config.instance.debug_kv_dir:
                    self._dump_kv(room, pages, len(ids))
                detok = requests.Detokenizer(st.engine)
                yield worker_pb2.DecodeResponse(
                    token_ids=[first], text=detok.push([first]),
                    routing=worker_pb2.RoutingInfo(
                        decode_dp_rank=st.dp_rank, prefill_dp_rank=prefill_rank, rank_path=_PATHS[path],
                        resolve_ms=(resolved - received) * 1e3, transfer_ms=(fetched - resolved) * 1e3))
                stops = requests.stop_ids(st.engine, request.sampling)
                if first in stops or budget == 1:
                    reason = common_pb2.FINISH_REASON_EOS if first in stops else common_pb2.FINISH_REASON_LENGTH
                    logs.event(log, logging.INFO, "decode done", tokens=1,
                               resolve_ms=round((resolved - received) * 1e3, 2))
                    yield worker_pb2.DecodeResponse(text=detok.flush(), finish_reason=reason)
                    return
                seq = Sequence(room, pages, len(ids), first, budget - 1, sampling, stops)
                pages = []  # the loop owns them now
                self.loop.join(seq)
                while (item := await seq.out.get()) is not None:
                    if isinstance(item, PdmeshError):
                        raise item
                    yield worker_pb2.DecodeResponse(token_ids=[item], text=detok.push([item]))
                reason = common_pb2.FINISH_REASON_EOS if seq.last_token in stops else common_pb2.FINISH_REASON_LENGTH
                logs.event(log, logging.INFO, "decode done", tokens=seq.position - len(ids) + 1,
                           resolve_ms=round((resolved - received) * 1e3, 2))
                yield worker_pb2.DecodeResponse(text=detok.flush(), finish_reason=reason)
            finally:
                st.pages.free(pages)
                if seq is not None and not seq.finished:
                    self.loop.abort(room, PdmeshError("the client went away"))

    def _dump_kv(self, room: int, pages: list[int], num_tokens: int) -> None:
        import os

        import torch

        from pdmesh.worker.engine.reference import kv_by_token
        path = os.path.join(self.state.config.instance.debug_kv_dir, f"{room}.pt")
        torch.save(kv_by_token(self.state.pages.kv, pages, num_tokens).cpu(), path)

    async def _resolve(self, request, room: int, hint: int | None, deadline: float, info=None):
        """(info, prefill rank, path) by the decode rule. A lookup names the instance and epoch the
        policy was read from: if the prefill was replaced meanwhile (another policy, perhaps), the
        bootstrap says so at once and the rank is resolved again from fresh info."""
        addr, iid = request.prefill_bootstrap_address, request.prefill_instance_id
        if info is None:
            info = await self.infos.get(addr, iid)
        for attempt in range(_RESOLVES):
            KvLayout.from_proto(info.kv_layout).check_compatible(self.state.layout)
            res = decode_rule(room, hint, info.dp_size, info.load_balance_method,
                              info.force_query_prefill_dp_rank)
            if not res.needs_lookup:
                return info, res.dp_rank, res.path
            client = shared_client(addr, self.state.config.instance.tls)
            # the prefill registers the room when its rank takes it: bounded on its own, not only by
            # the deadline (a prefill that never got the room costs this, logged with the room)
            wait = min(deadline - time.monotonic(), self.state.config.instance.unknown_room_wait_s)
            try:
                rank = await client.wait_for_room(room, max(wait, 0.001),
                                                  owner=(info.instance_id, info.epoch))
                return info, rank, res.path
            except DeadlineExceeded:
                log.warning("room %d: not registered by prefill %s within %.1f s (state RESOLVING)",
                            room, iid, wait)
                raise
            except FailedPrecondition as err:
                if err.reason != Reason.INSTANCE_EPOCH_CHANGED or attempt == _RESOLVES - 1:
                    raise
                info = await self._refreshed(addr, iid, info, room, err)

    async def _refreshed(self, addr: str, iid: str, info, room: int, err: PdmeshError):
        fresh = await self.infos.get(addr, iid, refresh=True)
        logs.event(log, logging.INFO, "prefill info refreshed", epoch=info.epoch, new_epoch=fresh.epoch,
                   method=fresh.load_balance_method, force_query=fresh.force_query_prefill_dp_rank,
                   cause=err.reason)
        return fresh

    def _endpoint(self, info, prefill_rank: int) -> str:
        for endpoint in info.rank_endpoints:
            if endpoint.dp_rank == prefill_rank:
                return endpoint.transfer_address
        raise NotFound(f"prefill {info.instance_id} publishes no endpoint for rank {prefill_rank}",
                       reason=Reason.RANK_ENDPOINT_NOT_FOUND, metadata={"dp_rank": prefill_rank})

    async def _fetch(self, request, info, prefill_rank, path, room, hint, pages, token, deadline):
        """Fetch the KV; (first token, info, prefill rank, path). A prefill that moved to a new epoch
        (a rank restarted, or a new process, maybe with another policy, replaced the instance) is
        noticed by the rank's epoch check before any wait: the info is refreshed and the rank
        resolved again. A request that never reached the rank (unreachable, or left unanswered on
        a link that is then closed) is tried once more on a fresh link. A transfer cut once it began
        is not retried: its offer is claimed."""
        addr, iid = request.prefill_bootstrap_address, request.prefill_instance_id
        for attempt in range(_RESOLVES):
            try:
                first = await self.state.transfer.fetch_room(
                    peer=self._endpoint(info, prefill_rank), room=room, epoch=info.epoch,
                    page_ids=pages, token=token, deadline=deadline)
                return first, info, prefill_rank, path
            except (EpochMismatch, Unavailable, DeadlineExceeded) as err:
                retry = isinstance(err, EpochMismatch) or err.reason in _NEVER_REACHED
                if attempt == _RESOLVES - 1 or not retry:
                    raise
                try:
                    fresh = await self._refreshed(addr, iid, info, room, err)
                except PdmeshError:
                    raise err from None
                if fresh.epoch == info.epoch and err.reason in _UNREACHABLE:
                    raise  # the same process is still published: it is really unreachable
                info, prefill_rank, path = await self._resolve(request, room, hint, deadline, fresh)
