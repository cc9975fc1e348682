"""The DP controller of one instance: its one gRPC endpoint in front of `dp_size` rank processes.

Owns: starting and supervising the ranks (`supervisor.RankSupervisor`), picking a rank per request
(`dispatch.Dispatcher`), forwarding the request to that rank with the caller's deadline, counting
what each rank holds, and the instance-wide admin calls (abort a room on every rank, status,
drain). The prefill/decode specifics (registration at the bootstrap service, the embedded
bootstrap service) live in `instance.py`; the per-request logic runs in the rank processes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

import grpc

from pdmesh.config import DEFAULT_DEADLINE_S
from pdmesh.errors import PdmeshError, Unavailable
from pdmesh.reasons import Reason
from pdmesh.rules import validate_room
from pdmesh.worker.config import InstanceConfig, RankConfig
from pdmesh.worker.instance.dispatch import Dispatcher
from pdmesh.worker.instance.supervisor import RankSupervisor
from pdmesh.worker.client import DecodeStream, WorkerClient
from pdmesh.worker.v1 import worker_pb2

log = logging.getLogger(__name__)

#: How long a request waits for a restarting rank before UNAVAILABLE.
RANK_READY_WAIT_S = 3.0
#: A draining instance stops only after it has been idle this long (see `Controller.drain`).
DRAIN_LINGER_S = 1.0


class Controller:
    """Ranks, dispatch and counting for one instance."""

    def gauge_samples(self):
        """Live gauges for /metrics: requests in flight, up and restarts per rank."""
        role = self.config.role
        for rank in self.ranks:
            r = str(rank.dp_rank)
            yield "pdmesh_controller_in_flight", (role, r), self.active[rank.dp_rank]
            yield "pdmesh_rank_up", (role, r), 1 if rank.alive else 0
            yield "pdmesh_rank_restarts", (role, r), rank.restarts

    def __init__(self, config: InstanceConfig, bootstrap_address: str | None,
                 on_epoch_change=None) -> None:
        self.config = config
        self.bootstrap_address = bootstrap_address
        self.dispatcher = Dispatcher(config.dp_size, config.load_balance_method)
        self.active = [0] * config.dp_size
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._epochs = [0] * config.dp_size
        self._on_epoch_change = on_epoch_change
        self._clients: dict[int, WorkerClient] = {}
        self.ranks = [RankSupervisor(lambda r=r: self._rank_config(r), self._rank_restarted)
                      for r in range(config.dp_size)]

    @property
    def epoch(self) -> int:
        """Changes whenever a rank (re)starts, so decodes refresh their cached instance info."""
        return max(self._epochs)

    def _rank_config(self, dp_rank: int) -> RankConfig:
        self._epochs[dp_rank] = max(time.time_ns(), self.epoch + 1)
        return RankConfig(self.config, dp_rank, self.bootstrap_address, self._epochs[dp_rank])

    async def start(self) -> None:
        results = await asyncio.gather(*(r.start() for r in self.ranks), return_exceptions=True)
        failed = [(r.dp_rank, e) for r, e in zip(self.ranks, results) if isinstance(e, BaseException)]
        if failed:
            await self.stop()
            raise Unavailable("ranks failed to start: " + "; ".join(f"rank {r}: {e}" for r, e in failed),
                              reason=Reason.RANK_START_FAILED)

    async def _rank_restarted(self, dp_rank: int) -> None:
        if self._on_epoch_change is not None:
            await self._on_epoch_change()

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.ranks), return_exceptions=True)

    # --- forwarding -----------------------------------------------------------------------------

    def pick(self, room: int, routed_dp_rank: int | None) -> int:
        if self.draining:
            raise Unavailable(f"instance {self.config.instance_id} is draining; send to another instance",
                              reason=Reason.INSTANCE_DRAINING, metadata={"instance_id": self.config.instance_id})
        validate_room(room)
        return self.dispatcher.pick(room, routed_dp_rank, self.active, [r.alive for r in self.ranks])

    async def ready_channel(self, dp_rank: int) -> grpc.aio.Channel:
        """The channel of a running rank, connected: a call on a channel that is still connecting
        (or backing off after a failed attempt) would fail at once instead of waiting for it."""
        rank = self.ranks[dp_rank]
        await rank.wait_ready(RANK_READY_WAIT_S)
        channel = rank.channel
        assert channel is not None
        if channel.get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY:
            try:
                await asyncio.wait_for(channel.channel_ready(), RANK_READY_WAIT_S)
            except asyncio.TimeoutError:
                raise Unavailable(f"{self.config.role} rank {dp_rank} of {self.config.instance_id} accepts no "
                                  f"connection within {RANK_READY_WAIT_S:.0f}s; retry shortly",
                                  reason=Reason.RANK_UNAVAILABLE, metadata={"dp_rank": dp_rank}) from None
        return channel

    @staticmethod
    def deadline(context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return DEFAULT_DEADLINE_S if remaining is None else max(remaining, 0.001)

    def rank_died(self, dp_rank: int, err: PdmeshError) -> PdmeshError:
        """The typed error of a forwarded call; an UNAVAILABLE that the rank did not send itself (no
        status details: the connection to its process broke) names the rank as gone."""
        if err.code == grpc.StatusCode.UNAVAILABLE and not err.sent_by_peer:
            return Unavailable(f"{self.config.role} rank {dp_rank} of {self.config.instance_id} "
                               f"went away mid-request ({err.message}); it is being restarted",
                               reason=Reason.RANK_DIED, metadata={"dp_rank": dp_rank})
        return err

    def client(self, dp_rank: int, channel: grpc.aio.Channel) -> WorkerClient:
        """The typed client of a rank's current channel (a new one after a restart)."""
        client = self._clients.get(dp_rank)
        if client is None or client.channel is not channel:
            client = self._clients[dp_rank] = WorkerClient(channel)
        return client

    async def unary(self, dp_rank: int, call: Callable[[WorkerClient, float], Awaitable], context):
        """Forward a unary call to `dp_rank` (`call(client, timeout)`), counting it as active there
        (from the step that picked it: a drain must not see the instance idle while a picked request
        waits for its rank)."""
        self._enter(dp_rank)
        try:
            client = self.client(dp_rank, await self.ready_channel(dp_rank))
            try:
                return await call(client, self.deadline(context))
            except PdmeshError as err:
                raise self.rank_died(dp_rank, err) from None
        finally:
            self._leave(dp_rank)

    async def stream(self, dp_rank: int, call: Callable[[WorkerClient, float], DecodeStream],
                     context) -> AsyncIterator:
        """Forward a server-streaming call to `dp_rank`; cancelling the caller cancels the rank's call."""
        self._enter(dp_rank)
        forwarded = None
        try:
            client = self.client(dp_rank, await self.ready_channel(dp_rank))
            forwarded = call(client, self.deadline(context))
            try:
                async for message in forwarded:
                    yield message
            except PdmeshError as err:
                raise self.rank_died(dp_rank, err) from None
        finally:
            if forwarded is not None:
                forwarded.cancel()
            self._leave(dp_rank)

    def _enter(self, dp_rank: int) -> None:
        self.active[dp_rank] += 1
        self._idle.clear()

    def _leave(self, dp_rank: int) -> None:
        self.active[dp_rank] -= 1
        if not any(self.active):
            self._idle.set()

    # --- instance-wide admin --------------------------------------------------------------------

    async def abort_room(self, request: worker_pb2.AbortRoomRequest) -> bool:
        async def one(rank: RankSupervisor) -> bool:
            if not rank.alive or rank.channel is None:
                return False
            try:
                return await self.client(rank.dp_rank, rank.channel).abort_room(
                    request.bootstrap_room, request.reason)
            except PdmeshError:
                return False
        return any(await asyncio.gather(*(one(r) for r in self.ranks)))

    async def status(self) -> worker_pb2.GetInstanceStatusResponse:
        async def one(rank: RankSupervisor) -> worker_pb2.RankStatus:
            # A rank too busy to answer within the timeout is still alive: its process is up.
            fallback = worker_pb2.RankStatus(dp_rank=rank.dp_rank, alive=rank.alive, restarts=rank.restarts,
                                             active_requests=self.active[rank.dp_rank])
            if not rank.alive or rank.channel is None:
                return fallback
            try:
                reply = await self.client(rank.dp_rank, rank.channel).status()
            except PdmeshError:
                return fallback
            status = reply.ranks[0]
            status.restarts = rank.restarts
            status.active_requests = max(status.active_requests, self.active[rank.dp_rank])
            return status
        ranks = await asyncio.gather(*(one(r) for r in self.ranks))
        return worker_pb2.GetInstanceStatusResponse(
            instance_id=self.config.instance_id, epoch=self.epoch, ranks=ranks, draining=self.draining)

    async def drain(self) -> None:
        """Stop taking requests and wait until none has been active for `DRAIN_LINGER_S`: a prefill's
        answer returns once its last KV bytes are handed to UCX, and its decode may still be taking
        them in; closing the links at once would cut that transfer."""
        self.draining = True
        while True:
            await self._idle.wait()
            await asyncio.sleep(DRAIN_LINGER_S)
            if self._idle.is_set():
                return
