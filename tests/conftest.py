"""Shared test fixtures: one torch thread per process, free loopback ports, the pdmesh command."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PDMESH_TORCH_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
PDMESH = [sys.executable, "-m", "pdmesh.cli"]


def free_port() -> int:
    """A loopback port that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pdmesh_cmd() -> list[str]:
    """The `pdmesh` command as the README runs it, for subprocess tests."""
    return list(PDMESH)


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The default real model (`--model smollm2`) converted into the model cache: built once per
    machine (PDMESH_CACHE_DIR, else ~/.cache/pdmesh; ~10 s), then read from there by every test."""
    from pdmesh.models import resolve_model

    return resolve_model("smollm2")
