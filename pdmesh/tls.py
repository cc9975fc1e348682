"""Optional TLS and mutual TLS for every pdmesh gRPC server and client.

Owns `TlsConfig` (certificate, key, CA, whether servers require client certificates, an optional
server-name override), the flags and `PDMESH_TLS_*` / `PDMESH_MTLS` variables that build it
(`add_arguments`, `from_args`, `to_argv` for a parent that starts children), and the gRPC
credentials made from it. `grpcutil.create_server(..., tls=)` and `grpcutil.open_channel(..., tls=)`
take a `TlsConfig` (or None for plaintext), so no other module touches `grpc.ssl_*`.

One config serves both ends of a process: its servers present `cert_file`/`key_file`, its clients
verify servers against `ca_file` and present the same certificate as their client certificate
(so a mesh certificate carries both the serverAuth and clientAuth key usages, or neither). With
`require_client_cert` (mTLS) a server refuses every peer whose certificate was not signed by
`ca_file`: a plaintext client, a TLS client without a certificate and one with a certificate of
another CA all fail the handshake and never reach a servicer.

Every server certificate must name the addresses clients dial (SANs): `127.0.0.1`/`localhost` on
one host, and the host's name or IP across hosts. A controller reaches its own rank processes on
127.0.0.1, so include 127.0.0.1 in every worker's certificate. `server_name` overrides the name
checked (`grpc.ssl_target_name_override`) when the dialled address is not in the certificate.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from dataclasses import dataclass
from typing import Any

import grpc

from pdmesh.config import env, env_flag

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings of one process (flags `--tls-*` / `--mtls`, or `PDMESH_TLS_*` / `PDMESH_MTLS`)."""

    cert_file: str | None = None
    """PEM certificate chain this process presents (as a server, and as a client under mTLS)."""
    key_file: str | None = None
    """PEM private key of `cert_file`."""
    ca_file: str | None = None
    """PEM CA bundle that peers' certificates must chain to (None: the system roots, client only)."""
    require_client_cert: bool = False
    """mTLS: servers refuse clients without a certificate signed by `ca_file`."""
    server_name: str | None = None
    """Name to check the server certificate against instead of the dialled host."""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("--tls-cert and --tls-key go together (PDMESH_TLS_CERT, PDMESH_TLS_KEY)")
        if not (self.cert_file or self.ca_file):
            raise ValueError("TLS needs --tls-cert/--tls-key (a server) or --tls-ca (a client)")
        if self.require_client_cert and not self.ca_file:
            raise ValueError("--mtls needs --tls-ca: the CA that client certificates must chain to")
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"TLS {name.removesuffix('_file')} file {path!r} does not exist")

    @property
    def has_identity(self) -> bool:
        """Whether this process has a certificate of its own (it can serve, and answer mTLS)."""
        return bool(self.cert_file)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for `server.add_secure_port` (client certificates required under mTLS)."""
        if not self.has_identity:
            raise ValueError("a TLS server needs --tls-cert and --tls-key")
        return grpc.ssl_server_credentials(
            [(_read(self.key_file), _read(self.cert_file))],
            root_certificates=_read(self.ca_file) if self.ca_file else None,
            require_client_auth=self.require_client_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for `grpc.aio.secure_channel`: verify the server, present our certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file) if self.ca_file else None,
            private_key=_read(self.key_file) if self.key_file else None,
            certificate_chain=_read(self.cert_file) if self.cert_file else None)

    def channel_options(self) -> tuple[tuple[str, Any], ...]:
        return (("grpc.ssl_target_name_override", self.server_name),) if self.server_name else ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "TlsConfig | None":
        return None if raw is None else cls(**raw)


def _read(path: str | None) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def make(cert: str | None = None, key: str | None = None, ca: str | None = None,
         mtls: bool = False, server_name: str | None = None) -> TlsConfig | None:
    """A `TlsConfig`, or None (plaintext) when no certificate, key or CA is given."""
    if not (cert or key or ca):
        if mtls:
            raise ValueError("--mtls needs --tls-ca, --tls-cert and --tls-key")
        return None
    return TlsConfig(cert or None, key or None, ca or None, mtls, server_name or None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The TLS flags every pdmesh command takes; each defaults to its `PDMESH_*` variable."""
    group = parser.add_argument_group("TLS (off unless a certificate or CA is given)")
    group.add_argument("--tls-cert", default=env("TLS_CERT"), metavar="PEM",
                       help="certificate chain this process presents (env PDMESH_TLS_CERT)")
    group.add_argument("--tls-key", default=env("TLS_KEY"), metavar="PEM",
                       help="private key of --tls-cert (env PDMESH_TLS_KEY)")
    group.add_argument("--tls-ca", default=env("TLS_CA"), metavar="PEM",
                       help="CA that peers' certificates must chain to (env PDMESH_TLS_CA)")
    group.add_argument("--mtls", action="store_true", default=env_flag("MTLS"),
                       help="mutual TLS: servers refuse clients without a certificate signed by "
                            "--tls-ca; clients present --tls-cert (env PDMESH_MTLS=1)")
    group.add_argument("--tls-server-name", default=env("TLS_SERVER_NAME"), metavar="NAME",
                       help="check server certificates against NAME instead of the dialled host "
                            "(env PDMESH_TLS_SERVER_NAME)")


def from_args(args: argparse.Namespace) -> TlsConfig | None:
    """The config of `add_arguments`' flags (ValueError with the flag named if inconsistent)."""
    return make(args.tls_cert, args.tls_key, args.tls_ca, args.mtls, args.tls_server_name)


def to_argv(tls: TlsConfig | None) -> list[str]:
    """The flags that give a child process the same TLS settings (absolute paths)."""
    if tls is None:
        return []
    argv: list[str] = []
    for flag, path in (("--tls-cert", tls.cert_file), ("--tls-key", tls.key_file), ("--tls-ca", tls.ca_file)):
        if path:
            argv += [flag, os.path.abspath(path)]
    if tls.require_client_cert:
        argv.append("--mtls")
    if tls.server_name:
        argv += ["--tls-server-name", tls.server_name]
    return argv


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(what: str, host: str, tls: TlsConfig | None) -> None:
    """Log a warning when `what` binds beyond loopback without mTLS (anyone could call it)."""
    if not is_loopback(host) and not (tls and tls.require_client_cert):
        log.warning("%s binds %s without mTLS: any host that reaches it can call it; use "
                    "--tls-cert/--tls-key/--tls-ca --mtls (README: Security)", what, host)
