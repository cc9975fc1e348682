"""Tests import the process helper as `procs`; it lives in the package so benchmarks share it."""

from testkit.proc import LOG_DIR, Proc, free_port, free_port_range, start_all, stop_all  # noqa: F401
