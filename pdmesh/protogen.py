"""Generate the protobuf and gRPC code (with .pyi stubs) from `protos/`.

Owns the one step that turns the contracts into Python. `make protos` (and so `make install`)
runs it; the output is never committed or edited by hand.

A proto package `pdmesh.<area>.v1` becomes the Python module path `pdmesh.<area>.v1`. Areas whose
Python package lives in a design-card folder (`worker/`, `router/`, `server/`) are written there,
the rest into the core `pdmesh/` folder, so every generated import resolves inside the one
`pdmesh` namespace that pyproject's `package-dir` lays out.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
# Python package folder of each top-level `pdmesh.<area>` that is mapped to a design-card folder.
MAPPED_AREAS = {"worker": ROOT / "worker", "router": ROOT / "router", "server": ROOT / "server"}


def _destination(area: str) -> Path:
    return MAPPED_AREAS.get(area, ROOT / "pdmesh" / area)


def generate() -> list[Path]:
    """Run protoc over every .proto under protos/ and place the output; return written folders."""
    import grpc_tools
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    if not sources:
        raise SystemExit("no .proto files under protos/")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as out:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed: " + " ".join(args))
        for version_dir in sorted(Path(out, "pdmesh").glob("*/v*")):
            area = version_dir.parent.name
            dest = _destination(area) / version_dir.name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(version_dir, dest)
            (dest / "__init__.py").write_text('"""Generated from protos/ by pdmesh.protogen; do not edit."""\n')
            area_init = dest.parent / "__init__.py"
            if not area_init.exists():
                area_init.write_text(f'"""Generated contracts of pdmesh.{area}; do not edit."""\n')
            written.append(dest)
    return written


def main() -> None:
    for dest in generate():
        print(f"generated {dest.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
