"""The fuzz tests' summary: inputs tried per RPC, printed at the end of the run."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # the fuzz_* helper modules

import fuzz_oracle  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    if fuzz_oracle.TALLY:
        terminalreporter.section("fuzz: inputs tried per RPC")
        terminalreporter.write_line(fuzz_oracle.summary(terminalreporter.config.getoption("verbose") > 0))
