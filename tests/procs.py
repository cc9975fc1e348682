"""Tests import the process helper as `procs`; it lives in testkit/ so benchmarks share it."""

from testkit.proc import (LOG_DIR, UP_PORTS, Proc, free_port, free_port_range, start_all,  # noqa: F401
                          start_up, stop_all, stop_up)
