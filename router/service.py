"""`RouterService`: Generate (pick a pair, draw rooms, call both sides, stream tokens) and admin.

For each sample the router draws a fresh room and a transfer token, and calls the prefill and the
decode at the same time. When it pins a prefill rank r (the client's `routed_dp_rank`, or its own
least-loaded choice with `pin_ranks`), it sends r to the prefill as `routed_dp_rank` and to both
sides as `disagg_prefill_dp_rank`, so the decode needs no lookup and no conflict can arise
(unless the client asks for `omit_rank_hint`: then the prefill alone hears of the pin). When
sampling, each sample after the first gets a seed derived from the request's (`sample_sampling`).
One message of each sample (the first after the prefill answered, at the latest the last) carries
the prompt's token count, from the prefill's answer.
A failure on one side cancels and aborts the other side; the first cause (the prefill's status
when the prefill failed) reaches the client unchanged, code and ErrorInfo. A sample that a worker
refuses because it drains (INSTANCE_DRAINING: nothing of it ran) is sent to another instance with
a fresh room, and the draining one is skipped from then on.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from pdmesh import logs, metrics
from pdmesh.errors import DeadlineExceeded, InvalidArgument, PdmeshError
from pdmesh.reasons import Reason
from pdmesh.rules import optional_dp_rank, validate_dp_rank
from pdmesh.grpcutil import translate_errors
from pdmesh.common.v1 import common_pb2
from pdmesh.router.instances import DECODE, PREFILL, InstanceEntry, InstanceTable
from pdmesh.router.rooms import draw_room, draw_token
from pdmesh.router.v1 import router_pb2, router_pb2_grpc
from pdmesh.tls import TlsConfig
from pdmesh.worker.v1 import worker_pb2

log = logging.getLogger(__name__)

MAX_SAMPLES = 16
#: Tries of one sample: a worker that refuses it because it drains is routed around (fresh room).
MAX_ATTEMPTS = 3
_DONE = object()
SEED_STRIDE = 0x9E3779B97F4A7C15  # odd: sample seeds of one request never collide


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 0
    #: round_robin | least_outstanding
    policy: str = "round_robin"
    #: Pin the least-loaded prefill rank when the client pins none.
    pin_ranks: bool = False
    #: Draw rooms with room % dp_size == pinned rank (for follow_bootstrap_room prefills).
    align_rooms: bool = False
    max_in_flight: int = 256
    max_queued: int = 1024
    queue_timeout_s: float = 5.0
    default_deadline_s: float = 120.0
    #: A sample's first token (prefill, rank resolution, KV transfer) comes within this, or the
    #: sample fails DEADLINE_EXCEEDED ROUTER_FIRST_TOKEN_TIMEOUT, however long the client's deadline.
    first_token_timeout_s: float = 60.0
    #: Each next token (or the end) comes within this of the last, or ROUTER_TOKEN_TIMEOUT.
    token_timeout_s: float = 30.0
    prefills: tuple[str, ...] = ()
    decodes: tuple[str, ...] = ()
    #: TLS of the router's server and of its channels to the instances (None = plaintext).
    tls: TlsConfig | None = None
    #: Serve Prometheus /metrics on this port (0 = a free one); None: no metrics endpoint.
    metrics_port: int | None = None
    #: Address of the /metrics endpoint; None: `host`.
    metrics_host: str | None = None
    #: Serve the OpenAI-compatible HTTP API on this port (0 = a free one); None: no HTTP API.
    http_port: int | None = None
    #: Address of the HTTP API; None: `host`.
    http_host: str | None = None
    #: The model name the HTTP API serves (`GET /v1/models`; requests must name it).
    served_model_name: str = "pdmesh"
    #: A model folder or a Jinja file with the chat template; None: the plain fallback.
    chat_template: str | None = None

    def __post_init__(self) -> None:
        for name in ("queue_timeout_s", "default_deadline_s", "first_token_timeout_s", "token_timeout_s"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"{name} must be > 0, got {getattr(self, name)}",
                                      reason=Reason.INVALID_ROUTER_CONFIG)


def sample_sampling(sampling: common_pb2.SamplingParams, index: int) -> common_pb2.SamplingParams:
    """Sample `index`'s parameters: when sampling (temperature > 0), samples after the first get
    their own seed derived from the request's, so n > 1 gives n draws, reproducible by seed."""
    if index == 0 or sampling.temperature <= 0:
        return sampling
    own = common_pb2.SamplingParams()
    own.CopyFrom(sampling)
    own.seed = (sampling.seed + index * SEED_STRIDE) & ((1 << 64) - 1)
    return own


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, table: InstanceTable, config: RouterConfig) -> None:
        self.table = table
        self.config = config

    # --- Generate -------------------------------------------------------------------------------

    @translate_errors
    async def Generate(self, request: router_pb2.GenerateRequest, context):
        async for reply in self.generate(request, context.time_remaining()):
            yield reply

    async def generate(self, request: router_pb2.GenerateRequest, timeout_s: float | None = None):
        """Generate's logic without gRPC (the HTTP API calls it in-process): yields every
        `GenerateResponse`, raises the typed `PdmeshError`. Closing the generator early (a client
        gone) cancels every sample and aborts both sides of each, as a cancelled call does."""
        started = time.perf_counter()
        n = request.n or 1
        if n > MAX_SAMPLES:
            raise InvalidArgument(f"n must be at most {MAX_SAMPLES}, got {n}", metadata={"n": n})
        if not request.prompt.text and not request.prompt.token_ids.ids:
            raise InvalidArgument("the prompt is empty: set prompt.text or prompt.token_ids",
                                  reason=Reason.EMPTY_PROMPT)
        prefill, decode = self.table.choose(PREFILL), self.table.choose(DECODE)
        pinned = self._pinned_rank(request, prefill)
        deadline = timeout_s or self.config.default_deadline_s
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._sample(i, request, prefill, decode, pinned, deadline,
                                                  started, queue)) for i in range(n)]
        finished = 0
        try:
            while finished < n:
                item = await queue.get()
                if isinstance(item, PdmeshError):
                    raise item
                if item is _DONE:
                    finished += 1
                    continue
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _pinned_rank(self, request, prefill: InstanceEntry) -> int | None:
        routed = optional_dp_rank(request, "routed_dp_rank")
        if routed is not None:
            return validate_dp_rank(routed, prefill.dp_size, field="routed_dp_rank")
        if self.config.pin_ranks and prefill.dp_size > 1:
            return prefill.least_loaded_rank()
        return None

    async def _sample(self, index, request, prefill: InstanceEntry, decode: InstanceEntry,
                      pinned: int | None, deadline: float, started: float, queue: asyncio.Queue) -> None:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                await self._attempt(index, request, prefill, decode, pinned, deadline, started, queue)
            except PdmeshError as err:
                moved = self._route_around(err, prefill, decode, pinned) if attempt < MAX_ATTEMPTS else None
                if moved is not None:
                    prefill, decode = moved
                    continue
                metrics.ROUTER_SAMPLES.labels(logs.current().get("path", "none"), err.code.name).inc()
                logs.event(log, logging.INFO, "sample failed", code=err.code.name, reason=err.reason,
                           state=err.metadata.get("state", ""))
                await queue.put(err)
                return
            await queue.put(_DONE)
            return

    def _route_around(self, err: PdmeshError, prefill: InstanceEntry, decode: InstanceEntry,
                      pinned: int | None) -> tuple[InstanceEntry, InstanceEntry] | None:
        """A new pair when a worker refused the sample because it drains (nothing of it ran), else
        None. The refusing instance is skipped from now on, without waiting for its next poll."""
        if err.reason != Reason.INSTANCE_DRAINING:
            return None
        gone = decode if decode.instance_id and err.metadata.get("instance_id") == decode.instance_id else prefill
        self.table.mark_draining(gone)
        try:
            other = self.table.choose(gone.role)
        except PdmeshError:
            return None
        if gone is prefill and pinned is not None and pinned >= other.dp_size:
            return None
        log.info("%s drains; sample goes to %s instead", gone.address, other.address)
        return (other, decode) if gone is prefill else (prefill, other)

    async def _attempt(self, index, request, prefill: InstanceEntry, decode: InstanceEntry,
                       pinned: int | None, deadline: float, started: float, queue: asyncio.Queue) -> None:
        room = draw_room(prefill.dp_size, pinned if self.config.align_rooms else None)
        token, request_id = draw_token(), uuid.uuid4().hex
        logs.bind(room=room, prefill_instance=prefill.instance_id, decode_instance=decode.instance_id,
                  prefill_rank=pinned, sample=index)
        sampling = sample_sampling(request.sampling, index)
        prefill_request = worker_pb2.PrefillRequest(
            bootstrap_room=room, prompt=request.prompt, sampling=sampling,
            transfer_token=token, request_id=request_id)
        decode_request = worker_pb2.DecodeRequest(
            bootstrap_room=room, prompt=request.prompt, sampling=sampling,
            prefill_instance_id=prefill.instance_id, prefill_bootstrap_address=prefill.bootstrap_address,
            transfer_token=token, request_id=request_id)
        if pinned is not None:
            prefill_request.routed_dp_rank = pinned
            if not request.omit_rank_hint:
                prefill_request.disagg_prefill_dp_rank = pinned
                decode_request.disagg_prefill_dp_rank = pinned
        async with prefill.admission.slot(), decode.admission.slot():
            prefill.outstanding += 1
            decode.outstanding += 1
            try:
                await self._run_pair(index, room, prefill, decode, prefill_request, decode_request,
                                     deadline, started, queue)
            finally:
                prefill.outstanding -= 1
                decode.outstanding -= 1

    async def _run_pair(self, index, room, prefill, decode, prefill_request, decode_request,
                        deadline, started, queue) -> None:
        prefill_task = asyncio.ensure_future(prefill.client.prefill(prefill_request, deadline))
        decode_call = decode.client.decode(decode_request, deadline)
        prefill_task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or decode_call.cancel())
        watchdog = _Watchdog(room, self.config, (prefill_task, decode_call))
        completed = counted = False
        try:
            first, ttft_s = True, 0.0
            async for message in decode_call:
                watchdog.streaming()
                reply = router_pb2.GenerateResponse(sample_index=index, token_ids=message.token_ids,
                                                    text=message.text, finish_reason=message.finish_reason)
                if first:
                    ttft_s = time.perf_counter() - started
                    reply.info.CopyFrom(router_pb2.RequestInfo(
                        bootstrap_room=room, prefill_instance=prefill.instance_id,
                        decode_instance=decode.instance_id, routing=message.routing,
                        ttft_ms=ttft_s * 1e3))
                    first = False
                    metrics.ROUTER_TTFT.observe(ttft_s)
                    logs.bind(path=metrics.path_name(message.routing.rank_path),
                              prefill_rank=message.routing.prefill_dp_rank,
                              decode_rank=message.routing.decode_dp_rank)
                if not counted and (prefill_task.done() or message.finish_reason):
                    # once the prefill answered (the latest: the last message, when the decode
                    # has long had the KV and the prefill's answer is due at once)
                    reply.prompt_tokens, counted = (await prefill_task).prompt_tokens, True
                await queue.put(reply)
            await prefill_task
            completed = True
            metrics.ROUTER_SAMPLES.labels(logs.current().get("path", "none"), "OK").inc()
            logs.event(log, logging.INFO, "sample done", ttft_ms=round(ttft_s * 1e3, 2))
        except (PdmeshError, asyncio.CancelledError) as exc:
            if watchdog.fired is not None:
                raise watchdog.fired from None
            raise await self._first_cause(exc, prefill_task) from None
        finally:
            watchdog.stop()
            if not completed:
                prefill_task.cancel()
                decode_call.cancel()
                await self._abort_both(room, prefill, decode)

    async def _first_cause(self, exc: BaseException, prefill_task: asyncio.Future) -> PdmeshError:
        """The prefill's error when the prefill failed (the decode's is its consequence)."""
        if prefill_task.done() and not prefill_task.cancelled() and prefill_task.exception() is not None:
            err = prefill_task.exception()
            if isinstance(err, PdmeshError):
                return err
        if isinstance(exc, asyncio.CancelledError):
            raise exc
        return exc

    async def _abort_both(self, room: int, prefill: InstanceEntry, decode: InstanceEntry) -> None:
        why = "router: the other side failed or the client cancelled"

        async def one(entry: InstanceEntry) -> None:
            try:
                await entry.client.abort_room(room, why)
            except PdmeshError as err:
                log.warning("abort of room %d at %s failed: %s", room, entry.address, err.code.name)
        await asyncio.shield(asyncio.gather(one(prefill), one(decode)))

    # --- admin ----------------------------------------------------------------------------------

    @translate_errors
    async def AddInstance(self, request, context) -> router_pb2.AddInstanceResponse:
        inst = request.instance
        entry = await self.table.add(inst.role, inst.address, inst.bootstrap_address)
        return router_pb2.AddInstanceResponse(instance=entry.to_proto())

    @translate_errors
    async def RemoveInstance(self, request, context) -> router_pb2.RemoveInstanceResponse:
        await self.table.remove(request.address)
        return router_pb2.RemoveInstanceResponse()

    @translate_errors
    async def ListInstances(self, request, context) -> router_pb2.ListInstancesResponse:
        return router_pb2.ListInstancesResponse(instances=[e.to_proto() for e in self.table.list()])


class _Watchdog:
    """The router's own bound on each state of a sample: waiting for the first token, then for each
    next one. When one runs out it cancels both calls (the workers see their caller go and free
    what the room holds) and the sample fails DEADLINE_EXCEEDED, logged with its room and state."""

    def __init__(self, room: int, config: RouterConfig, calls) -> None:
        self.room, self.config, self.calls = room, config, calls
        self.fired: PdmeshError | None = None
        self.state = "WAITING_FOR_FIRST_TOKEN"
        self._timer = asyncio.get_running_loop().call_later(config.first_token_timeout_s, self._fire,
                                                            config.first_token_timeout_s)

    def streaming(self) -> None:
        self._timer.cancel()
        self.state = "STREAMING"
        self._timer = asyncio.get_running_loop().call_later(self.config.token_timeout_s, self._fire,
                                                            self.config.token_timeout_s)

    def stop(self) -> None:
        self._timer.cancel()

    def _fire(self, bound: float) -> None:
        reason = Reason.ROUTER_FIRST_TOKEN_TIMEOUT if self.state != "STREAMING" else Reason.ROUTER_TOKEN_TIMEOUT
        what = "a first token" if self.state != "STREAMING" else "the next token"
        self.fired = DeadlineExceeded(
            f"room {self.room}: no {what} within {bound:g} s (state {self.state}); the workers are "
            "stuck or overloaded", reason=reason,
            metadata={"bootstrap_room": self.room, "state": self.state, "bound_s": bound})
        log.warning("room %d: %s after %g s without %s; cancelling both sides", self.room, self.state,
                    bound, what)
        for call in self.calls:
            call.cancel()
