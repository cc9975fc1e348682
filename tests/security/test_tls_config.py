"""`pdmesh.tls`: flags and PDMESH_* variables -> TlsConfig, its checks, and how it travels to
child processes (`pdmesh up`'s flags, a rank's RankConfig JSON). Also: every command binds
127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import importlib

import pytest

from pdmesh import tls
from pdmesh.tls import TlsConfig
from pdmesh.worker.config import InstanceConfig, RankConfig
from pki import Pki, make_pki

ENV = ("PDMESH_TLS_CERT", "PDMESH_TLS_KEY", "PDMESH_TLS_CA", "PDMESH_MTLS", "PDMESH_TLS_SERVER_NAME")
COMMANDS = {"bootstrap": "pdmesh.server.cli", "router": "pdmesh.router.cli", "up": "pdmesh.router.up",
            "prefill": "pdmesh.worker.instance.prefill_cli", "decode": "pdmesh.worker.instance.decode_cli"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PDMESH_UP_HOST", raising=False)
    return monkeypatch


def parse(command: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command]).configure_parser(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_the_tls_flags(clean_env, pki, command):
    assert tls.from_args(parse(command, [])) is None  # plaintext unless asked
    args = parse(command, [*pki.node_argv(), "--tls-server-name", "localhost"])
    assert tls.from_args(args) == TlsConfig(pki.node_cert, pki.node_key, pki.ca, True, "localhost")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_binds_loopback_by_default(clean_env, command):
    for name in ("BOOTSTRAP_HOST", "ROUTER_HOST", "PREFILL_HOST", "DECODE_HOST", "UP_HOST"):
        clean_env.delenv(f"PDMESH_{name}", raising=False)
    assert parse(command, []).host == "127.0.0.1"


def test_variables_are_the_defaults_of_the_flags(clean_env, pki):
    clean_env.setenv("PDMESH_TLS_CERT", pki.node_cert)
    clean_env.setenv("PDMESH_TLS_KEY", pki.node_key)
    clean_env.setenv("PDMESH_TLS_CA", pki.ca)
    clean_env.setenv("PDMESH_MTLS", "1")
    clean_env.setenv("PDMESH_TLS_SERVER_NAME", "localhost")
    assert tls.from_args(parse("router", [])) == pki.node(mtls=True, server_name="localhost")
    # a flag wins over its variable
    assert tls.from_args(parse("router", ["--tls-ca", pki.rogue_ca])).ca_file == pki.rogue_ca


@pytest.mark.parametrize("kwargs,message", [
    (dict(mtls=True), "--mtls needs"),
    (dict(cert="CERT"), "go together"),
    (dict(key="KEY"), "go together"),
])
def test_inconsistent_settings_are_refused(pki, kwargs, message):
    files = {"CERT": pki.node_cert, "KEY": pki.node_key}
    with pytest.raises(ValueError, match=message):
        tls.make(**{k: files.get(v, v) for k, v in kwargs.items()})


def test_a_ca_alone_makes_a_client_that_cannot_serve(pki):
    config = tls.make(ca=pki.ca)
    assert config == TlsConfig(ca_file=pki.ca) and not config.has_identity
    with pytest.raises(ValueError, match="needs --tls-cert"):
        config.server_credentials()


def test_missing_files_and_mtls_without_ca_are_refused(pki, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        TlsConfig(str(tmp_path / "nope.pem"), pki.node_key, pki.ca)
    with pytest.raises(ValueError, match="--mtls needs --tls-ca"):
        TlsConfig(pki.node_cert, pki.node_key, None, require_client_cert=True)


def test_children_get_the_same_settings(clean_env, pki, tmp_path):
    """`pdmesh up` hands its TLS flags to every process it starts; a rank gets them in its JSON."""
    config = pki.node(mtls=True, server_name="localhost")
    assert tls.from_args(parse("router", tls.to_argv(config))) == config
    from pdmesh.router import up
    children = up.plan(parse("up", [*pki.node_argv()]), tmp_path)
    assert {c.name for c in children} == {"bootstrap", "prefill", "decode", "router"}
    for child in children:
        assert child.argv[-len(pki.node_argv()):] == tls.to_argv(pki.node())
        assert tls.from_args(parse(child.name, child.argv[4:])) == pki.node()
    rank = RankConfig(InstanceConfig("decode", "decode-0", tls=config), dp_rank=1)
    assert RankConfig.from_json(rank.to_json()) == rank
    plain = RankConfig(InstanceConfig("decode", "decode-0"), dp_rank=0)
    assert RankConfig.from_json(plain.to_json()).instance.tls is None


def test_loopback_check():
    assert all(tls.is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(tls.is_loopback(h) for h in ("0.0.0.0", "10.0.0.5", "example.com", "::"))
