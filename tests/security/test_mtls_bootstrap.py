"""The bootstrap service under mTLS: only a client with a certificate of the mesh CA registers or
looks anything up; a plaintext client, a TLS client without a certificate and one whose
certificate comes from another CA all fail and leave the registry untouched. Also: TLS without
client certificates, the server-name override, grpcurl with and without certificates, and
`pdmesh bootstrap --demo` configured by the PDMESH_TLS_* variables alone.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdmesh.errors import PdmeshError, Unavailable
from testkit.proc import Proc
from pdmesh.server.client import BootstrapClient
from pdmesh.server.config import BootstrapConfig
from pdmesh.server.demo import instance_info
from pdmesh.tls import TlsConfig
from pki import Pki, ThreadedBootstrap, make_pki

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
SERVICE = "pdmesh.bootstrap.v1.BootstrapService"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_server(pki):
    server = ThreadedBootstrap(BootstrapConfig(tls=pki.node(mtls=True)))
    yield server
    server.close()


BAD_CLIENTS = {"plaintext": lambda pki: None, "tls-without-cert": Pki.no_cert, "rogue-ca-cert": Pki.rogue}


@pytest.mark.parametrize("kind", BAD_CLIENTS)
def test_client_without_a_valid_certificate_can_neither_register_nor_look_up(mtls_server, pki, kind):
    tls = BAD_CLIENTS[kind](pki)
    instance_id = f"intruder-{kind}"

    async def go():
        async with BootstrapClient(mtls_server.address, tls=tls, default_timeout_s=3.0,
                                   connect_timeout_s=1.0) as client:
            calls = {
                "register_instance": client.register_instance(instance_info(instance_id)),
                "register_room": client.register_room("prefill-ok", 4242, dp_rank=0),
                "lookup_room": client.lookup_room(4242),
                "list_instances": client.list_instances(),
                "wait_for_room (stream)": client.wait_for_room(4242, timeout=2.0),
                "lookup_rooms (stream)": client.lookup_rooms([4242], timeout=2.0),
            }
            failures = {}
            for name, call in calls.items():
                with pytest.raises(PdmeshError) as info:
                    await call
                failures[name] = info.value
            return failures

    failures = asyncio.run(go())
    # refused at the handshake: the transport failed, no servicer ran
    assert all(isinstance(err, Unavailable) for err in failures.values()), failures
    assert not [i for i in mtls_server.registry.list_instances() if i.instance_id == instance_id]
    assert mtls_server.registry.lookup(4242) is None


def test_client_with_a_certificate_of_the_mesh_ca_registers_and_looks_up(mtls_server, pki):
    async def go():
        for tls in (pki.node(), pki.client()):  # a mesh node, and a client-only certificate
            async with BootstrapClient(mtls_server.address, tls=tls) as client:
                info = instance_info(f"prefill-{tls.cert_file.rsplit('/', 1)[-1]}")
                await client.register_instance(info)
                room = 7000 + len(info.instance_id)
                waiter = asyncio.ensure_future(client.wait_for_room(room, timeout=5.0))
                assert await client.register_room(info.instance_id, room, dp_rank=1, request_id="r1")
                assert await waiter == 1
                assert (await client.lookup_room(room)).dp_rank == 1
                assert await client.lookup_rooms([room, room + 1]) == {room: 1, room + 1: None}
                assert info.instance_id in {i.instance_id for i in await client.list_instances()}

    asyncio.run(go())


def test_server_name_override(mtls_server, pki):
    async def lookup(tls: TlsConfig):
        async with BootstrapClient(mtls_server.address, tls=tls, default_timeout_s=3.0) as client:
            return await client.list_instances()

    # 127.0.0.1 is dialled; "localhost" is in the certificate too, "elsewhere.example" is not
    assert isinstance(asyncio.run(lookup(pki.node(server_name="localhost"))), list)
    with pytest.raises(Unavailable):
        asyncio.run(lookup(pki.node(server_name="elsewhere.example")))


def test_tls_without_client_certificates(pki):
    server = ThreadedBootstrap(BootstrapConfig(tls=pki.node(mtls=False)))

    async def list_with(tls):
        async with BootstrapClient(server.address, tls=tls, default_timeout_s=3.0) as client:
            return await client.list_instances()

    try:
        assert asyncio.run(list_with(pki.no_cert())) == []  # encrypted, no client identity needed
        with pytest.raises(Unavailable):
            asyncio.run(list_with(None))  # plaintext against a TLS port
        # a client that trusts another CA does not accept the server
        with pytest.raises(Unavailable):
            asyncio.run(list_with(TlsConfig(ca_file=pki.rogue_ca)))
    finally:
        server.close()


def _grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GRPCURL, "-max-time", "5", *args], capture_output=True, text=True, timeout=30)


def test_grpcurl_needs_the_client_certificate(mtls_server, pki):
    ok = _grpcurl("-cacert", pki.ca, "-cert", pki.client_cert, "-key", pki.client_key,
                  mtls_server.address, "list")
    assert ok.returncode == 0 and SERVICE in ok.stdout.split(), ok.stderr
    for args in (["-plaintext"], ["-cacert", pki.ca],
                 ["-cacert", pki.ca, "-cert", pki.rogue_cert, "-key", pki.rogue_key]):
        refused = _grpcurl(*args, mtls_server.address, "list")
        assert refused.returncode != 0 and SERVICE not in refused.stdout, (args, refused.stdout)


def test_pdmesh_bootstrap_takes_tls_from_the_environment(pki):
    proc = Proc("bootstrap-mtls-env", ["bootstrap", "--port", "0", "--demo"], env={
        "PDMESH_TLS_CERT": pki.node_cert, "PDMESH_TLS_KEY": pki.node_key, "PDMESH_TLS_CA": pki.ca,
        "PDMESH_MTLS": "1"})
    proc.start()
    try:
        address = proc.wait_ready(30)
        deadline = time.monotonic() + 30  # the demo client talks to it under mTLS too
        while not any("demo: done" in line for line in proc.lines):
            assert proc.alive() and time.monotonic() < deadline, proc.tail()
            time.sleep(0.05)
        assert f"grpcurl -cacert {pki.ca} -cert <client.pem> -key <client.key> {address} list" in proc.tail()

        async def go():
            async with BootstrapClient(address, tls=pki.client()) as client:
                await client.register_instance(instance_info("prefill-env"))
                assert {i.instance_id for i in await client.list_instances()} == {"prefill-env", "demo-prefill"}
            async with BootstrapClient(address, default_timeout_s=3.0) as plaintext:
                with pytest.raises(Unavailable):
                    await plaintext.list_instances()

        asyncio.run(go())
    finally:
        assert proc.stop() == 0, proc.tail()
