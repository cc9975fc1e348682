"""Packaging: generated code is never committed, protos live where their packages say, and the
bootstrap entry points run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_not_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert tracked, "not a git checkout"
    assert not [p for p in tracked if p.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))]


def test_proto_directories_match_packages():
    for proto in (ROOT / "protos").rglob("*.proto"):
        package = next(line.split()[1].rstrip(";") for line in proto.read_text().splitlines()
                       if line.startswith("package "))
        assert proto.parent.relative_to(ROOT / "protos").as_posix() == package.replace(".", "/")


def test_bootstrap_entry_points_answer_help():
    for argv in (["-m", "pdmesh.server", "--help"], ["-m", "pdmesh.cli", "bootstrap", "--help"]):
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "--room-ttl" in out.stdout and "PDMESH_BOOTSTRAP_PORT" in out.stdout


def test_import_names_live_in_the_pdmesh_namespace():
    import pdmesh.server.service as service
    assert Path(service.__file__).resolve().parent == ROOT / "server"
    assert (ROOT / "server" / "__init__.py").read_text().strip(), "server/__init__.py needs its docstring"
