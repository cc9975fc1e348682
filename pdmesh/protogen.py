"""Generate the protobuf and gRPC code (with .pyi stubs) from `protos/`.

Owns the one step that turns the contracts into Python. `make protos` (and so `make install`)
runs it into the source tree; the package build (`setup.py`) runs it into the wheel's build folder
and the sdist's release tree. The output is never committed or edited by hand.

A proto package `pdmesh.<area>.v1` becomes the Python module path `pdmesh.<area>.v1`. In the source
tree (and an sdist), areas whose Python package lives in a design-card folder (`worker/`, `router/`,
`server/`) are written there, the rest into the core `pdmesh/` folder, so every generated import
resolves inside the one `pdmesh` namespace that pyproject's `package-dir` lays out. In a build
folder the namespace is laid out already: everything goes under `pdmesh/<area>/`.

Contracts of other projects that ours import (`google/rpc/status.proto`) come from the installed
googleapis-common-protos, whose Python modules the generated code imports at run time. `make
protos` also copies them into `.protodeps/` (never committed) so that `buf lint` sees them.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
# Python package folder (relative to the tree's root) of each `pdmesh.<area>` mapped to a
# design-card folder; the same mapping as pyproject's package-dir.
MAPPED_AREAS = {"worker": "worker", "router": "router", "server": "server"}
# Imported contracts of other projects, found in the installed googleapis-common-protos.
THIRD_PARTY = ("google/rpc/status.proto",)
PROTODEPS = ROOT / ".protodeps"


def source_layout(root: Path = ROOT) -> Callable[[str], Path]:
    """Where area `pdmesh.<area>` lives in a source tree (this checkout or an sdist) at `root`."""
    return lambda area: root / MAPPED_AREAS[area] if area in MAPPED_AREAS else root / "pdmesh" / area


def package_layout(root: Path) -> Callable[[str], Path]:
    """Where area `pdmesh.<area>` lives in a build folder (the installed layout) at `root`."""
    return lambda area: root / "pdmesh" / area


def generated_packages(protos: Path = PROTOS) -> set[str]:
    """Dotted names of the packages `generate` writes (a source tree's copies are not sources)."""
    names: set[str] = set()
    for version_dir in Path(protos, "pdmesh").glob("*/v*"):
        area = version_dir.parent.name
        names.add(f"pdmesh.{area}.{version_dir.name}")
        if area not in MAPPED_AREAS:
            names.add(f"pdmesh.{area}")
    return names


def include_dirs() -> list[Path]:
    """protoc's import paths besides protos/: the well-known types and googleapis' contracts."""
    import grpc_tools
    from google.rpc import status_pb2

    googleapis = Path(status_pb2.__file__).resolve().parents[2]
    missing = [p for p in THIRD_PARTY if not (googleapis / p).is_file()]
    if missing:
        raise SystemExit(f"{missing} not found under {googleapis}: install googleapis-common-protos")
    return [Path(grpc_tools.__file__).parent / "_proto", googleapis]


def generate(destination: Callable[[str], Path] | None = None, protos: Path = PROTOS) -> list[Path]:
    """Run protoc over every .proto under `protos` and place the output where `destination(area)`
    says (default: this source tree); return the written folders."""
    from grpc_tools import protoc

    destination = destination or source_layout()
    sources = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    if not sources:
        raise SystemExit(f"no .proto files under {protos}")
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", f"-I{protos}", *(f"-I{d}" for d in include_dirs()), f"--python_out={out}",
                f"--pyi_out={out}", f"--grpc_python_out={out}", *sources]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed: " + " ".join(args))
        for version_dir in sorted(Path(out, "pdmesh").glob("*/v*")):
            area = version_dir.parent.name
            dest = destination(area) / version_dir.name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(version_dir, dest)
            (dest / "__init__.py").write_text('"""Generated from protos/ by pdmesh.protogen; do not edit."""\n')
            area_init = dest.parent / "__init__.py"
            if not area_init.exists():
                area_init.write_text(f'"""Generated contracts of pdmesh.{area}; do not edit."""\n')
            written.append(dest)
    return written


def copy_third_party(dest: Path = PROTODEPS) -> Path:
    """Copy the imported contracts of other projects into `dest` (for `buf lint`)."""
    googleapis = include_dirs()[1]
    for name in THIRD_PARTY:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(googleapis / name, dest / name)
    return dest


def main() -> None:
    for dest in generate():
        print(f"generated {dest.relative_to(ROOT)}", file=sys.stderr)
    print(f"copied {', '.join(THIRD_PARTY)} into {copy_third_party().relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
