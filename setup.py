"""Build hooks of the pdmesh distribution (the metadata is in pyproject.toml).

- Packages: every folder with an `__init__.py` under each folder of pyproject's `package-dir`
  (`pdmesh/`, `server/`, `router/`, `worker/` -> one `pdmesh` namespace), so subpackages such as
  `pdmesh.worker.kv` are never left out. Generated packages found in a source tree are skipped:
  they are written afresh by the build.
- Generated code: `pdmesh/protogen.py` runs grpcio-tools over `protos/` into the wheel's build
  folder (`build_py`) and into the sdist's release tree (`sdist`), so both hold the `*_pb2`
  modules while the repository holds none. An editable install (`make install`) generates nothing
  here: the Makefile runs `python -m pdmesh.protogen` into the source tree.
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent


def _protogen():
    """pdmesh/protogen.py, loaded by path (importing `pdmesh` would need its dependencies)."""
    spec = importlib.util.spec_from_file_location("_pdmesh_protogen", HERE / "pdmesh" / "protogen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_packages(package_dir: dict[str, str], skip: set[str]) -> list[str]:
    """Every package under each mapped folder (those holding an `__init__.py`), minus `skip`."""
    found = []
    for name, folder in package_dir.items():
        for path, dirs, files in os.walk(HERE / folder):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            if "__init__.py" not in files:
                dirs.clear()  # not a package: nothing below it is one either
                continue
            rel = Path(path).relative_to(HERE / folder)
            dotted = ".".join((name, *rel.parts))
            if dotted not in skip:
                found.append(dotted)
    return sorted(found)


class BuildPyWithProtos(build_py):
    """build_py, then the generated code into the build folder (not for editable installs)."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            protogen = _protogen()
            self._generated = protogen.generate(protogen.package_layout(Path(self.build_lib)))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        generated = [str(f) for d in getattr(self, "_generated", []) for f in d.rglob("*") if f.is_file()]
        return super().get_outputs(include_bytecode) + generated


class SdistWithProtos(sdist):
    """sdist whose release tree also holds the generated code, laid out as in the source tree."""

    def make_release_tree(self, base_dir: str, files) -> None:
        super().make_release_tree(base_dir, files)
        protogen = _protogen()
        protogen.generate(protogen.source_layout(Path(base_dir)))


PACKAGE_DIR = tomllib.loads((HERE / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
setup(packages=find_packages(PACKAGE_DIR, _protogen().generated_packages(HERE / "protos")),
      cmdclass={"build_py": BuildPyWithProtos, "sdist": SdistWithProtos})
