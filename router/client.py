"""A small Python client of `RouterService`: generate text, stream tokens, get typed errors.

    async with RouterClient("127.0.0.1:50101") as client:
        result = await client.generate("Hello", max_new_tokens=16)
        print(result.text, result.info.ttft_ms)

Failed calls raise the typed `pdmesh.errors.PdmeshError` subclasses (with the ErrorInfo reason).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import grpc

from pdmesh import grpcutil
from pdmesh.common.v1 import common_pb2
from pdmesh.errors import PdmeshError, Unavailable
from pdmesh.reasons import Reason
from pdmesh.router.v1 import router_pb2, router_pb2_grpc
from pdmesh.tls import TlsConfig
from pdmesh.worker.v1 import worker_pb2


@dataclass
class Sample:
    """One finished sample."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    info: router_pb2.RequestInfo = field(default_factory=router_pb2.RequestInfo)
    finish_reason: str = ""

    @property
    def rank_path(self) -> str:
        return common_pb2.RankPath.Name(self.info.routing.rank_path).removeprefix("RANK_PATH_").lower()


def build_request(prompt: str | Sequence[int], *, max_new_tokens: int = 16, n: int = 1,
                  routed_dp_rank: int | None = None, temperature: float = 0.0, seed: int = 0,
                  ignore_eos: bool = False) -> router_pb2.GenerateRequest:
    if isinstance(prompt, str):
        p = worker_pb2.Prompt(text=prompt)
    else:
        p = worker_pb2.Prompt(token_ids=worker_pb2.TokenIds(ids=list(prompt)))
    request = router_pb2.GenerateRequest(
        prompt=p, n=n, sampling=common_pb2.SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, ignore_eos=ignore_eos))
    if routed_dp_rank is not None:
        request.routed_dp_rank = routed_dp_rank
    return request


class RouterClient:
    def __init__(self, address: str, *, credentials: grpc.ChannelCredentials | None = None,
                 tls: TlsConfig | None = None) -> None:
        self.channel = grpcutil.open_channel(address, credentials=credentials, tls=tls)
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)

    async def __aenter__(self) -> "RouterClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def connect(self, timeout: float = 30.0) -> None:
        """Open the connection now (HTTP/2 handshake done). A client about to start a burst of calls
        from one busy event loop connects first: the handshake must not wait behind the burst."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"no connection to the router within {timeout:g} s",
                              reason=Reason.ROUTER_UNREACHABLE) from None

    async def stream(self, prompt: str | Sequence[int], *, timeout: float = 120.0,
                     **kwargs) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Every response message as it arrives."""
        call = self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as err:
            raise PdmeshError.from_rpc_error(err) from None
        finally:
            call.cancel()

    async def generate_samples(self, prompt: str | Sequence[int], **kwargs) -> list[Sample]:
        samples: dict[int, Sample] = {}
        async for message in self.stream(prompt, **kwargs):
            sample = samples.setdefault(message.sample_index, Sample())
            sample.token_ids.extend(message.token_ids)
            sample.text += message.text
            if message.HasField("info"):
                sample.info = message.info
            if message.finish_reason:
                sample.finish_reason = common_pb2.FinishReason.Name(message.finish_reason)
        return [samples[i] for i in sorted(samples)]

    async def generate(self, prompt: str | Sequence[int], **kwargs) -> Sample:
        """The one sample of a request with n = 1."""
        return (await self.generate_samples(prompt, **kwargs))[0]
