"""Packaging: generated code is never committed, protos live where their packages say, the
bootstrap entry points run, and the built wheel and sdist hold everything (generated code
included): the wheel, installed into a fresh venv, runs a mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

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


# ---- the built distribution: a wheel and an sdist that hold everything ----------------------------

def _expected_modules(package_dir: dict[str, str]) -> set[str]:
    """Every module the source tree's packages hold, plus every module protoc generates."""
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    names = set()
    for package, folder in package_dir.items():
        for path in tracked:
            rel = Path(path)
            if rel.parts[0] == folder and (ROOT / rel.parent / "__init__.py").exists():
                parts = [*package.split("."), *rel.with_suffix("").parts[1:]]
                names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    for proto in (ROOT / "protos").rglob("*.proto"):
        module = ".".join(proto.relative_to(ROOT / "protos").with_suffix("").parts)
        names |= {module + "_pb2", module + "_pb2_grpc", module.rsplit(".", 1)[0]}
    return names


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """An sdist of this checkout, and a wheel built from that sdist (so the sdist must be whole).

    Built without build isolation (the project venv has setuptools and grpcio-tools) so the test
    needs no registry; pyproject's build-system.requires is checked separately."""
    out = tmp_path_factory.mktemp("dist")
    sdist = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert sdist.returncode == 0, sdist.stderr[-3000:]
    sdist_path = out / sdist.stdout.split()[-1]
    unpacked = out / "src"
    with tarfile.open(sdist_path) as tar:
        tar.extractall(unpacked, filter="data")
    (tree,) = unpacked.iterdir()
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", "-w", str(out), str(tree)],
                           capture_output=True, text=True, timeout=300)
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    (wheel_path,) = out.glob("pdmesh-*.whl")
    return {"sdist": sdist_path, "wheel": wheel_path, "out": out}


def test_build_requires_the_code_generator():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert any(r.startswith("grpcio-tools") for r in requires), requires
    assert any(r.startswith("googleapis-common-protos") for r in requires), requires


def test_sdist_holds_sources_protos_and_generated_code(built):
    with tarfile.open(built["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "pdmesh", "server", "router", "worker", "protos"],
                             cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert set(tracked) <= names, sorted(set(tracked) - names)
    for generated in ("pdmesh/bootstrap/v1/bootstrap_pb2.py", "pdmesh/common/v1/common_pb2.py",
                      "worker/v1/worker_pb2_grpc.py", "router/v1/router_pb2.py", "setup.py"):
        assert generated in names


def test_wheel_installs_into_a_fresh_venv_and_runs_a_mesh(built, tmp_path):
    """`pip install pdmesh-*.whl` into a fresh venv gives a working `pdmesh up`.

    The venv gets the wheel alone (--no-deps); a .pth line lends it the project venv's third-party
    packages (plain paths: that venv's own .pth files, the editable pdmesh finder among them, are
    not run). Every pdmesh module must then resolve inside the fresh venv."""
    import sysconfig
    from procs import UP_PORTS, free_port_range

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    lent = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "pdmesh-test-deps.pth").write_text("".join(f"{p}\n" for p in lent))
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                              "--no-deps", "--no-index", "--disable-pip-version-check", str(built["wheel"])],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = subprocess.run([str(python), "-c", (
        "import importlib.util, json, pkgutil, pdmesh\n"
        "mods = {m.name: importlib.util.find_spec(m.name).origin\n"
        "        for m in pkgutil.walk_packages(pdmesh.__path__, 'pdmesh.')}\n"
        "mods['pdmesh'] = pdmesh.__file__\n"
        "print(json.dumps(mods))")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    origins = json.loads(where.stdout)
    assert all(Path(o).is_relative_to(site) for o in origins.values()), origins
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    missing = _expected_modules(package_dir) - set(origins)
    assert not missing, f"the wheel lacks {sorted(missing)}"

    up = subprocess.run([str(venv / "bin" / "pdmesh"), "up", "--once", "--dp-size", "1",
                         "--base-port", str(free_port_range(UP_PORTS)), "--log-dir", str(tmp_path / "logs")],
                        cwd=tmp_path, env={**env, "PDMESH_TORCH_THREADS": "1"}, capture_output=True,
                        text=True, timeout=280)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in (tmp_path / "logs").glob("*.log"))
    assert up.returncode == 0, up.stdout + up.stderr + logs
    assert "same text as one colocated engine: yes" in up.stdout, up.stdout
