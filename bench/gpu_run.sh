#!/bin/sh
# Run a command on the GPU machine with pdmesh importable, without a venv or a network:
#   sh bench/gpu_run.sh python3 -m bench gpu --no-readme     (what `make bench-gpu` runs)
# 1. installs the wheels that `make gpu-wheels` downloaded into .gpu/wheels/<group>/ (only the
#    groups sent along: ucx for the transfers, grpc for the worker's transfer code, test for
#    pytest) into $PDMESH_GPU_SITE with pip --no-index --no-deps, over the machine's own torch;
# 2. makes the `pdmesh` namespace of pyproject's package-dir mapping (pdmesh/ plus worker/,
#    server/, router/) as a folder of links, so no editable install (and no setuptools) is needed;
# 3. puts both first on PYTHONPATH and runs the command from the repository root.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SITE=${PDMESH_GPU_SITE:-/tmp/pdmesh-gpu-site}
PY=${GPU_PY:-python3}
mkdir -p "$SITE"
WHEELS=$(find "$ROOT/.gpu/wheels" -name '*.whl' 2>/dev/null | sort || true)
if [ -n "$WHEELS" ] && [ ! -f "$SITE/.installed" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --disable-pip-version-check --target "$SITE" $WHEELS
    touch "$SITE/.installed"
fi
NS="$SITE/ns/pdmesh"
rm -rf "$SITE/ns" && mkdir -p "$NS"
for entry in "$ROOT"/pdmesh/*; do ln -s "$entry" "$NS/"; done
for sub in server router worker; do [ -d "$ROOT/$sub" ] && ln -s "$ROOT/$sub" "$NS/$sub"; done
export PYTHONPATH="$SITE/ns:$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1  # else `python -m` puts the root first, whose pdmesh/ lacks worker/
export PDMESH_TORCH_THREADS=${PDMESH_TORCH_THREADS:-1}
cd "$ROOT"
exec "$@"
