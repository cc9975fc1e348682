"""The router's `GenerateResponse` stream -> OpenAI response objects and stream chunks.

`deltas(generate, job)` runs one job on the router's Generate logic (in-process) and yields a
`Delta` per piece of a sample's text: stop strings applied (`StopMatcher`: text that could begin
a stop string is held back until it cannot), the finish reason on a sample's last delta
(`stop` for a stop string or the model's end of sequence, `length` for the token budget). Once
every sample has finished and one was ended by a stop string, the stream is closed: the router
cancels what still runs and aborts both sides, so no page stays held for unwanted tokens.

`completion_body` / `chunk` shape the answers as OpenAI's completions and chat completions do;
with `return_routing` each choice carries a `pdmesh` object (where that sample went).
"""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from pdmesh import metrics
from pdmesh.common.v1 import common_pb2
from pdmesh.router.openai_protocol import CHAT, Job
from pdmesh.router.v1 import router_pb2

Generate = Callable[[router_pb2.GenerateRequest], AsyncIterator[router_pb2.GenerateResponse]]


class StopMatcher:
    """Cuts a growing text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = max((n for s in self.stops for n in range(1, min(len(s), len(self.pending) + 1))
                    if self.pending.endswith(s[:n])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Sample:
    """What one sample has produced so far."""

    index: int
    matcher: StopMatcher
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    finish: str | None = None
    stopped_early: bool = False
    info: router_pb2.RequestInfo | None = None


@dataclass
class Delta:
    index: int
    text: str
    finish: str | None
    info: router_pb2.RequestInfo | None = None


@dataclass
class Run:
    """A job's samples, filled while `deltas` runs (for the final usage and bodies)."""

    job: Job
    samples: list[Sample] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.samples = [Sample(i, StopMatcher(self.job.stop)) for i in range(self.job.n)]

    def usage(self) -> dict[str, int]:
        prompt = max((s.prompt_tokens for s in self.samples), default=0)
        completion = sum(s.tokens for s in self.samples)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _take(sample: Sample, message: router_pb2.GenerateResponse) -> Delta:
    first = sample.info is None and message.HasField("info")
    if first:
        sample.info = message.info
    sample.tokens += len(message.token_ids)
    sample.prompt_tokens = message.prompt_tokens or sample.prompt_tokens
    text, hit = sample.matcher.push(message.text)
    if hit:
        sample.finish, sample.stopped_early = "stop", True
    elif message.finish_reason:
        text += sample.matcher.flush()
        sample.finish = "length" if message.finish_reason == common_pb2.FINISH_REASON_LENGTH else "stop"
    sample.text += text
    return Delta(sample.index, text, sample.finish, message.info if first else None)


async def deltas(generate: Generate, run: Run) -> AsyncIterator[Delta]:
    """Every sample's text as it comes (see the module docstring)."""
    samples = run.samples
    async with aclosing(generate(run.job.request)) as stream:
        async for message in stream:
            sample = samples[message.sample_index]
            if sample.finish is not None:
                continue  # tokens after a stop string: dropped, the sample is being cancelled
            delta = _take(sample, message)
            if delta.text or delta.finish or delta.info is not None:  # nothing held back alone
                yield delta
            if all(s.finish for s in samples) and any(s.stopped_early for s in samples):
                return  # aclosing cancels the samples still running past their stop string


def routing(info: router_pb2.RequestInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    r = info.routing
    return {"bootstrap_room": info.bootstrap_room, "prefill_instance": info.prefill_instance,
            "decode_instance": info.decode_instance, "prefill_dp_rank": r.prefill_dp_rank,
            "decode_dp_rank": r.decode_dp_rank, "rank_path": metrics.path_name(r.rank_path),
            "ttft_ms": round(info.ttft_ms, 3), "resolve_ms": round(r.resolve_ms, 3),
            "transfer_ms": round(r.transfer_ms, 3)}


def _head(run: Run, chunk: bool) -> dict[str, Any]:
    kind = run.job.kind + (".chunk" if chunk and run.job.kind == CHAT else "")
    prefix = "chatcmpl-" if run.job.kind == CHAT else "cmpl-"
    return {"id": prefix + run.id, "object": kind, "created": run.created, "model": run.job.model}


def completion_body(run: Run) -> dict[str, Any]:
    """The whole answer of a request without `stream`."""
    choices = []
    for s in run.samples:
        choice: dict[str, Any] = {"index": s.index}
        if run.job.kind == CHAT:
            choice["message"] = {"role": "assistant", "content": s.text}
        else:
            choice["text"] = s.text
        choice.update(logprobs=None, finish_reason=s.finish or "stop")
        if run.job.return_routing:
            choice["pdmesh"] = routing(s.info)
        choices.append(choice)
    return {**_head(run, False), "choices": choices, "usage": run.usage()}


def chunk(run: Run, delta: Delta) -> dict[str, Any]:
    """One stream event for `delta` (the first of a chat sample also says the role)."""
    choice: dict[str, Any] = {"index": delta.index}
    if run.job.kind == CHAT:
        choice["delta"] = {"role": "assistant", "content": delta.text} if delta.info is not None \
            else {"content": delta.text}
    else:
        choice["text"] = delta.text
    choice.update(logprobs=None, finish_reason=delta.finish)
    if run.job.return_routing and delta.info is not None:
        choice["pdmesh"] = routing(delta.info)
    body = {**_head(run, True), "choices": [choice]}
    if run.job.include_usage:
        body["usage"] = None
    return body


def usage_chunk(run: Run) -> dict[str, Any]:
    """The last event when `stream_options.include_usage` is set: no choices, the usage."""
    return {**_head(run, True), "choices": [], "usage": run.usage()}
