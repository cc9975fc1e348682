# pdmesh: every target installs what it needs into .venv first (a fresh machine needs nothing else).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PROTOS  := $(shell find protos -name '*.proto')
GEN     := $(VENV)/.protos
PYTEST_ARGS ?=

.PHONY: install protos run test bench bench-gpu gpu-wheels lint clean

install: $(GEN)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $@

# Generated code comes from protos/ (grpcio-tools, pinned with the protobuf runtime); never committed.
$(GEN): $(STAMP) $(PROTOS) pdmesh/protogen.py
	$(PY) -m pdmesh.protogen
	touch $@

protos:
	rm -f $(GEN)
	$(MAKE) $(GEN)

# The main job: the whole mesh on loopback, a demo request, then serve until Ctrl-C.
run: install
	$(VENV)/bin/pdmesh up

test: install
	PDMESH_TORCH_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) -m bench

lint: install
	npx --yes @bufbuild/buf lint

clean:
	rm -rf $(VENV) build *.egg-info
	find . -path ./.git -prune -o -name __pycache__ -type d -print | xargs rm -rf
