"""The router's OpenAI-compatible HTTP API against a real `pdmesh up`, with the official `openai`
client and `curl`.

The package's one `pdmesh up` (tests/router/conftest.py) serves it: bootstrap, router (HTTP API on
base + 4), a follow_bootstrap_room prefill (dp 2) and a decode (dp 2), each a separate process,
the exact `tiny` engine. Greedy text
through HTTP must equal one colocated engine's, as through gRPC.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import aiohttp
import grpc
import openai
import pytest

from pdmesh.router.chat_template import fallback
from pdmesh.router.cli import RouterApp
from pdmesh.router.service import RouterConfig
from pdmesh.router.up import colocated_text
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc
from testkit.faultkit import wait_until

PROMPT = "An OpenAI client talks to the mesh"


@pytest.fixture(scope="module")
def client(mesh):
    with openai.OpenAI(base_url=mesh["url"], api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def pools_full(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        status = worker_pb2_grpc.InstanceServiceStub(channel).GetInstanceStatus(
            worker_pb2.GetInstanceStatusRequest(), timeout=10)
    return all(r.free_pages == r.total_pages and r.active_requests == 0 for r in status.ranks)


def both_pools_full(mesh) -> bool:
    return pools_full(mesh["prefill"]) and pools_full(mesh["decode"])



def test_models_and_completion_equal_the_colocated_engine(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == colocated_text(PROMPT, 12, model=None, preset="tiny")
    assert reply.choices[0].finish_reason == "length"
    # the byte tokenizer: one id per UTF-8 byte plus BOS
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(PROMPT.encode()) + 1, 12)


def test_chat_streams_the_same_text_as_without_stream(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    expected = colocated_text(fallback(messages), 10, model=None, preset="tiny")
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices


def test_n_samples_have_their_own_rooms_and_seeds(client):

    def sample(**kwargs):
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, n=3, temperature=1.0,
                                         seed=11, extra_body={"return_routing": True, "ignore_eos": True},
                                         **kwargs)
    choices = sorted(sample().choices, key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1, 2]
    assert len({c.pdmesh["bootstrap_room"] for c in choices}) == 3
    assert len({c.text for c in choices}) == 3  # a seed per sample: three draws
    again = sorted(sample().choices, key=lambda c: c.index)
    assert [c.text for c in again] == [c.text for c in choices]  # the same seed: the same draws
    streamed, rooms = ["", "", ""], set()
    for chunk in sample(stream=True):
        choice = chunk.choices[0]
        streamed[choice.index] += choice.text
        if getattr(choice, "pdmesh", None):  # the first chunk of each sample says where it went
            rooms.add(choice.pdmesh["bootstrap_room"])
    assert streamed == [c.text for c in choices] and len(rooms) == 3


def test_a_pinned_rank_takes_the_hint_path(client):
    for rank in (0, 1):
        reply = client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=3, temperature=0,
            extra_body={"routed_dp_rank": rank, "return_routing": True})
        info = reply.choices[0].pdmesh
        assert (info["prefill_dp_rank"], info["rank_path"]) == (rank, "hint"), info
        assert info["prefill_instance"] == "prefill-0" and info["bootstrap_room"] > 0


def test_the_follow_bootstrap_room_conflict_is_409_with_its_reason(mesh, client):
    """Pinned without the hint, 16 samples: some room is odd or even against the pinned rank
    (all 16 aligned by chance: 2**-16), so the prefill refuses and the whole request fails. A
    stream whose first token came before the refusal ends with an error event of the same code."""
    extra = {"routed_dp_rank": 0, "omit_rank_hint": True}
    with pytest.raises(openai.ConflictError) as err:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, n=16, temperature=0,
                                          extra_body=extra)
    assert err.value.status_code == 409
    assert err.value.code == "FOLLOW_BOOTSTRAP_ROOM_CONFLICT"
    assert "PDMESH_FORCE_QUERY_PREFILL_DP_RANK=1" in err.value.message
    with pytest.raises(openai.APIError) as err:
        list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, n=16, stream=True,
                                               temperature=0, extra_body=extra))
    assert err.value.code == "FOLLOW_BOOTSTRAP_ROOM_CONFLICT"
    assert wait_until(lambda: both_pools_full(mesh), 30)


def test_what_the_engine_cannot_do_is_a_clear_400(client):
    cases = [({"presence_penalty": 0.5}, "presence_penalty"), ({"logit_bias": {"5": 1}}, "logit_bias"),
             ({"top_k": 5}, "top_k"), ({"logprobs": 2}, "logprobs"), ({"echo": True}, "echo")]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body=extra)
        assert (err.value.code, err.value.param) == ("UNSUPPORTED_PARAMETER", param), extra
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=[10**6], max_tokens=2)
    assert err.value.code == "TOKEN_OUT_OF_VOCABULARY"  # the worker's own status, unchanged
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=PROMPT, extra_body={"routed_dp_rank": 5})
    assert err.value.code == "DP_RANK_OUT_OF_RANGE"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    assert err.value.code == "MODEL_NOT_FOUND"


def test_a_stop_string_cuts_the_text_and_frees_the_pages(mesh, client):
    full = colocated_text(PROMPT, 40, model=None, preset="tiny")
    stop = next(full[i:i + 2] for i in range(8, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    expected = full[:full.find(stop)]
    for stream in (False, True):
        reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=400, temperature=0,
                                                  stop=[stop], stream=stream, extra_body={"ignore_eos": True})
        chunks = list(reply) if stream else reply.choices
        text = "".join(c.choices[0].text for c in chunks) if stream else chunks[0].text
        assert text == expected
        assert (chunks[-1].choices[0] if stream else chunks[0]).finish_reason == "stop"
    assert wait_until(lambda: both_pools_full(mesh), 30)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (make sysdeps)")
def test_curl_streams_server_sent_events(mesh):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True,
            "ignore_eos": True}
    out = subprocess.run(["curl", "-sSN", f"{mesh['url']}/completions", "-H", "Content-Type: application/json",
                          "-d", json.dumps(body)], capture_output=True, text=True, timeout=60, check=True).stdout
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == colocated_text(PROMPT, 6, model=None, preset="tiny")


def test_a_client_gone_mid_stream_aborts_both_sides(mesh, client):
    """The generation would run to the context's end (about 4000 tokens); the client leaves after
    a few. Both pools must be full again long before the rest could have been generated."""
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1 << 20, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
    stamps = []
    for _ in stream:
        stamps.append(time.monotonic())
        if len(stamps) == 21:
            break
    stream.close()  # closes the connection mid-body
    gone = time.monotonic()
    per_token = (stamps[-1] - stamps[0]) / 20
    assert wait_until(lambda: both_pools_full(mesh), 60)
    left = 4096 - len(PROMPT) - 21
    assert time.monotonic() - gone < left * per_token / 4, (time.monotonic() - gone, per_token)


async def _burst_and_empty_router(mesh) -> tuple[list, dict, tuple]:
    """An in-process router with one slot and no queue in front of the mesh's instances, and
    one with no instance at all, both with the HTTP API on a free port."""
    small = await RouterApp(RouterConfig(prefills=(mesh["prefill"],), decodes=(mesh["decode"],),
                                         max_in_flight=1, max_queued=0, http_port=0,
                                         served_model_name="tiny")).start()
    empty = await RouterApp(RouterConfig(http_port=0, served_model_name="tiny")).start()
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "ignore_eos": True}
    try:
        async with aiohttp.ClientSession() as session:
            async def post(port: int):
                async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as reply:
                    return reply.status, dict(reply.headers), await reply.json()
            burst = await asyncio.gather(*(post(small.http_port) for _ in range(4)))
            async with session.get(f"http://127.0.0.1:{empty.http_port}/health") as reply:
                health = reply.status, await reply.json()
            return burst, health, await post(empty.http_port)
    finally:
        await small.stop(0)
        await empty.stop(0)


def test_capacity_is_429_with_retry_after_and_no_instance_is_503(mesh):
    burst, health, unavailable = asyncio.run(_burst_and_empty_router(mesh))
    refused = [(headers, body) for status, headers, body in burst if status == 429]
    assert refused and any(status == 200 for status, _, _ in burst), [s for s, _, _ in burst]
    for headers, body in refused:
        assert body["error"]["code"] == "ROUTER_AT_CAPACITY" and body["error"]["type"] == "rate_limit_error"
        assert int(headers["Retry-After"]) >= 1 and int(headers["retry-after-ms"]) > 0
    assert health == (503, {"status": "unavailable", "healthy_instances": {"prefill": 0, "decode": 0}})
    status, _, body = unavailable
    assert (status, body["error"]["code"]) == (503, "NO_HEALTHY_INSTANCE")
