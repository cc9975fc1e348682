"""Certificates made at test time (the `cryptography` package): a mesh CA, a node certificate for
127.0.0.1/localhost that every pdmesh process serves and dials with, a client-only certificate,
and a rogue CA with a certificate for the same names. Also a bootstrap server on its own thread.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pdmesh.server.config import BootstrapConfig
from pdmesh.server.service import create_bootstrap_server
from pdmesh.tls import TlsConfig

_DAY = datetime.timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> str:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return str(path)


def _write_cert(path: Path, cert: x509.Certificate) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _ca(cn: str) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(cn: str, ca: tuple[x509.Certificate, Any], *, server: bool) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca[0].subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - _DAY).not_valid_after(now + _DAY)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(ca[1], hashes.SHA256()), key


@dataclass(frozen=True)
class Pki:
    ca: str
    node_cert: str
    node_key: str
    client_cert: str
    client_key: str
    rogue_ca: str
    rogue_cert: str
    rogue_key: str

    def node(self, mtls: bool = True, server_name: str | None = None) -> TlsConfig:
        """What every pdmesh process of the mesh runs with."""
        return TlsConfig(self.node_cert, self.node_key, self.ca, mtls, server_name)

    def client(self) -> TlsConfig:
        """A client with a certificate of the mesh CA (not a server certificate)."""
        return TlsConfig(self.client_cert, self.client_key, self.ca)

    def no_cert(self) -> TlsConfig:
        """A TLS client that trusts the mesh CA but has no certificate of its own."""
        return TlsConfig(ca_file=self.ca)

    def rogue(self) -> TlsConfig:
        """A client whose certificate (same names) comes from another CA."""
        return TlsConfig(self.rogue_cert, self.rogue_key, self.ca)

    def node_argv(self) -> list[str]:
        return ["--tls-cert", self.node_cert, "--tls-key", self.node_key, "--tls-ca", self.ca, "--mtls"]


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, rogue_ca = _ca("pdmesh test CA"), _ca("rogue CA")
    node, client, rogue = _leaf("pdmesh node", ca, server=True), _leaf("client", ca, server=False), \
        _leaf("pdmesh node", rogue_ca, server=True)
    d = directory
    return Pki(ca=_write_cert(d / "ca.pem", ca[0]),
               node_cert=_write_cert(d / "node.pem", node[0]), node_key=_write_key(d / "node.key", node[1]),
               client_cert=_write_cert(d / "client.pem", client[0]),
               client_key=_write_key(d / "client.key", client[1]),
               rogue_ca=_write_cert(d / "rogue-ca.pem", rogue_ca[0]),
               rogue_cert=_write_cert(d / "rogue.pem", rogue[0]), rogue_key=_write_key(d / "rogue.key", rogue[1]))


class ThreadedBootstrap:
    """A bootstrap server on a private thread and event loop (as another process would be)."""

    def __init__(self, config: BootstrapConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        created = self.run(self._create(config))
        self.service = created.service
        self.address = f"127.0.0.1:{created.port}"
        self.registry = self.service.registry

    async def _create(self, config: BootstrapConfig):
        created = create_bootstrap_server("127.0.0.1:0", config)
        await created.service.start()
        return created

    def run(self, coro: Awaitable) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.run(self.service.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
