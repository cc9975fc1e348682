"""A direct PD client for benchmarks: send one room to a prefill and a decode at once, time it."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass

from pdmesh import grpcutil
from pdmesh.common.v1 import common_pb2
from pdmesh.errors import PdmeshError
from pdmesh.worker.client import WorkerClient
from pdmesh.worker.v1 import worker_pb2


@dataclass
class PairResult:
    ttft_ms: float
    total_ms: float
    tokens: int
    prefill: worker_pb2.PrefillResponse
    routing: worker_pb2.RoutingInfo
    token_times: list[float]
    token_ids: list[int]


class PdClient:
    """Channels to one prefill and one decode instance."""

    def __init__(self, prefill: str, decode: str, bootstrap: str, prefill_id: str) -> None:
        self.prefill = WorkerClient(grpcutil.open_channel(prefill))
        self.decode = WorkerClient(grpcutil.open_channel(decode))
        self.bootstrap, self.prefill_id = bootstrap, prefill_id

    async def pair(self, prompt_ids: list[int], max_new_tokens: int = 1, *, pin: int | None = None,
                   room: int | None = None) -> PairResult:
        room = room or secrets.randbits(63) or 1
        token = secrets.token_bytes(16)
        prompt = worker_pb2.Prompt(token_ids=worker_pb2.TokenIds(ids=prompt_ids))
        sampling = common_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
        p_req = worker_pb2.PrefillRequest(bootstrap_room=room, prompt=prompt, sampling=sampling,
                                          transfer_token=token)
        d_req = worker_pb2.DecodeRequest(bootstrap_room=room, prompt=prompt, sampling=sampling,
                                         prefill_instance_id=self.prefill_id,
                                         prefill_bootstrap_address=self.bootstrap, transfer_token=token)
        if pin is not None:
            p_req.routed_dp_rank = pin
            p_req.disagg_prefill_dp_rank = pin
            d_req.disagg_prefill_dp_rank = pin
        start = time.perf_counter()
        p_call = asyncio.ensure_future(self.prefill.prefill(p_req, timeout=600))
        times, routing, tokens, ids = [], None, 0, []
        try:
            async for message in self.decode.decode(d_req, timeout=600):
                if message.token_ids:
                    times.append(time.perf_counter())
                    tokens += len(message.token_ids)
                    ids.extend(message.token_ids)
                if message.HasField("routing"):
                    routing = message.routing
            reply = await p_call
        except PdmeshError:
            p_call.cancel()
            raise
        end = time.perf_counter()
        return PairResult((times[0] - start) * 1e3, (end - start) * 1e3, tokens, reply, routing,
                          [(t - start) * 1e3 for t in times], ids)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def arun(coro):
    return asyncio.run(coro)
