"""A whole mesh under mTLS, started the README way (`pdmesh up` with the TLS flags, which it hands
to every process it starts): bootstrap, router, a prefill and a decode (one DP rank each, every
rank a process of its own behind an mTLS server), serving a request end to end.

Every gRPC server of the mesh refuses a client without a certificate of the mesh CA; the router
serves only clients that have one. And through the real prefill process: a rogue UCX receiver
that knows the room and the prefill rank's transfer address but not the transfer token gets
UNAUTHENTICATED, while the receiver with the token gets the room's KV and first token.
"""

from __future__ import annotations

import ast
import asyncio
import re
import secrets
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh import grpcutil
from pdmesh.errors import Unauthenticated, Unavailable
from testkit.proc import start_up, stop_up
from pdmesh.router.client import RouterClient
from pdmesh.router.up import DEMO_PROMPT
from pdmesh.server.client import BootstrapClient
from pdmesh.tls import TlsConfig
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc
from pki import Pki, make_pki

BAD_CLIENTS = {"plaintext": lambda pki: None, "tls-without-cert": Pki.no_cert, "rogue-ca-cert": Pki.rogue}
RANK_READY = re.compile(r"rank \d+ ready pid=\d+ grpc=(\S+)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mesh(pki, tmp_path_factory):
    logs = tmp_path_factory.mktemp("mtls-up-logs")
    up, base = start_up("up-mtls", "--model-preset", "tiny", "--dp-size", "1", *pki.node_argv(), log_dir=logs)
    yield {"up": up, "logs": logs, "bootstrap": f"127.0.0.1:{base}", "router": f"127.0.0.1:{base + 1}",
           "prefill": f"127.0.0.1:{base + 2}", "decode": f"127.0.0.1:{base + 3}",
           "http": f"https://127.0.0.1:{base + 4}"}
    stop_up(up)


def _rank_addresses(logs: Path) -> list[str]:
    return [m.group(1) for name in ("prefill.log", "decode.log")
            for m in RANK_READY.finditer((logs / name).read_text(errors="replace"))]


async def _health(address: str, tls: TlsConfig | None) -> int:
    async with grpcutil.open_channel(address, tls=tls) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3.0)
        return reply.status


def test_the_mesh_serves_a_request_end_to_end_over_mtls(mesh, pki):
    text = "".join(mesh["up"].lines)
    assert "same text as one colocated engine: yes" in text, mesh["up"].tail()
    printed = ast.literal_eval(re.search(r"^text   : (.*)$", text, re.M).group(1))

    async def go():
        async with RouterClient(mesh["router"], tls=pki.client()) as client:
            return await client.generate(DEMO_PROMPT, max_new_tokens=24)

    sample = asyncio.run(go())
    assert sample.text == printed  # what `pdmesh up` checked against one colocated engine


@pytest.mark.parametrize("kind", BAD_CLIENTS)
def test_the_router_refuses_clients_without_a_valid_certificate(mesh, pki, kind):
    async def go():
        async with RouterClient(mesh["router"], tls=BAD_CLIENTS[kind](pki)) as client:
            await client.generate(DEMO_PROMPT, max_new_tokens=4, timeout=5.0)

    with pytest.raises(Unavailable):
        asyncio.run(go())


def test_every_server_of_the_mesh_requires_a_mesh_certificate(mesh, pki):
    ranks = _rank_addresses(mesh["logs"])
    assert len(ranks) == 2, ranks  # the prefill's rank and the decode's rank
    servers = [mesh[name] for name in ("bootstrap", "router", "prefill", "decode")] + ranks

    async def go():
        for address in servers:
            assert await _health(address, pki.client()) == health_pb2.HealthCheckResponse.SERVING, address
            for kind, make in BAD_CLIENTS.items():
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _health(address, make(pki))
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (address, kind)

    asyncio.run(go())


def test_the_bootstrap_refuses_registration_without_a_certificate(mesh, pki):
    from pdmesh.server.demo import instance_info

    async def go():
        for kind, make in BAD_CLIENTS.items():
            async with BootstrapClient(mesh["bootstrap"], tls=make(pki), default_timeout_s=3.0) as client:
                with pytest.raises(Unavailable):
                    await client.register_instance(instance_info(f"intruder-{kind}"))
                with pytest.raises(Unavailable):
                    await client.get_instance("prefill-0")
        async with BootstrapClient(mesh["bootstrap"], tls=pki.client()) as client:
            return [i.instance_id for i in await client.list_instances()]

    assert asyncio.run(go()) == ["prefill-0"]  # the mesh's prefill registered over mTLS, no intruder


def test_a_rogue_receiver_cannot_take_kv_from_a_real_prefill(mesh, pki):
    """The decode's half played by the test: the prefill is asked (over mTLS) to prefill a room for
    the holder of `token`; a rogue receiver that learnt the room and the rank's transfer address
    asks for the KV with another token and is refused; the holder of the token gets it."""
    import torch

    from pdmesh.common.v1 import common_pb2
    from pdmesh.worker.kv.layout import KvLayout
    from pdmesh.worker.kv.pool import KvPool
    from pdmesh.worker.transfer import KvReceiver, TransferConfig, make_transport
    from pdmesh.worker.transfer.config import apply_ucx_defaults

    apply_ucx_defaults()
    prompt = list(range(40, 60))
    room, token = secrets.randbits(63) or 1, secrets.token_bytes(16)

    async def go():
        async with BootstrapClient(mesh["bootstrap"], tls=pki.client()) as bootstrap:
            info = await bootstrap.get_instance("prefill-0")
        address = next(e.transfer_address for e in info.rank_endpoints if e.dp_rank == 0)
        layout = KvLayout.from_proto(info.kv_layout)
        pages = layout.pages_for_tokens(len(prompt))
        config = TransferConfig(connect_timeout_s=5.0)
        rogue, real = KvReceiver(make_transport("ucx"), config=config), KvReceiver(make_transport("ucx"), config=config)
        stolen, pool = KvPool(layout, pages), KvPool(layout, pages)
        async with grpcutil.open_channel(mesh["prefill"], tls=pki.client()) as channel:
            prefill = worker_pb2_grpc.PrefillServiceStub(channel).Prefill(worker_pb2.PrefillRequest(
                bootstrap_room=room, prompt=worker_pb2.Prompt(token_ids=worker_pb2.TokenIds(ids=prompt)),
                sampling=common_pb2.SamplingParams(max_new_tokens=4), routed_dp_rank=0,
                disagg_prefill_dp_rank=0, transfer_token=token, request_id="security-test"), timeout=60.0)
            try:
                with pytest.raises(Unauthenticated) as refused:
                    await rogue.fetch(address, room, epoch=info.epoch, pool=stolen, page_ids=stolen.alloc(pages),
                                      token=secrets.token_bytes(16), timeout=30.0)
                first = await real.fetch(address, room, epoch=info.epoch, pool=pool,
                                         page_ids=pool.alloc(pages), token=token, timeout=30.0)
                response = await grpcutil.call(prefill)
            finally:
                prefill.cancel()
                for end in (rogue, real):
                    await end.close()
                    await end.transport.close()
        return refused.value, first, response, stolen, pool

    refused, first, response, stolen, pool = asyncio.run(asyncio.wait_for(go(), 90))
    assert refused.reason == "KV_TRANSFER_TOKEN_MISMATCH", refused
    assert not torch.any(stolen.kv.view(torch.uint8))
    assert first == response.first_token_id and response.prompt_tokens == len(prompt)
    assert torch.any(pool.kv.view(torch.uint8))  # the real receiver got the prompt's KV


def test_the_http_api_is_https_and_asks_for_a_client_certificate(mesh, pki):
    import ssl
    import urllib.request

    def health(cert: bool) -> int:
        context = ssl.create_default_context(cafile=pki.ca)
        context.check_hostname = False  # the node certificate names the mesh's hosts, not 127.0.0.1
        if cert:
            context.load_cert_chain(pki.client_cert, pki.client_key)
        with urllib.request.urlopen(f"{mesh['http']}/health", context=context, timeout=20) as reply:
            return reply.status
    assert health(cert=True) == 200
    with pytest.raises(OSError):  # ssl.SSLError or a reset: the handshake wants a certificate
        health(cert=False)
