"""Tests import the process helper as `procs`; it lives in testkit/ so benchmarks share it."""

from testkit.proc import (LOG_DIR, Proc, free_port, free_port_range, start_all, start_up,  # noqa: F401
                          stop_all, stop_up)
