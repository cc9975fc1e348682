"""The contracts stay lint-clean under buf's STANDARD rules (`make lint` runs the same command)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("npx") is None, reason="npx (Node.js) is not installed; README lists it")
def test_buf_lint_standard_is_clean():
    out = subprocess.run(["npx", "--yes", "@bufbuild/buf", "lint"], cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == ""
