"""Compiling one CPU kernel with numba, once per process, for the compiled loops of worker/kv
(copy_numba.py, pack_numba.py).

    kernel = LazyKernel(define, "the CPU pack")   # define() returns the Python loop
    run = kernel()                                # the compiled loop, or None without numba

Compiled on first use with the GIL released for the whole call and cached beside the loop's
source file where that is writable (else compiled in each process); where numba cannot be
imported the caller falls back to torch, said once in the log. numba checks a cache entry only
against the loop's own source file, so an edit of the helpers it inlines (numba_stores.py) alone
would keep running the old code: the entry's stamp here also names numba_stores.py's.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)
_OPTIONS = dict(nogil=True, boundscheck=False, error_model="numpy")


class LazyKernel:
    def __init__(self, define: Callable[[], Callable], what: str) -> None:
        self._define, self._what = define, what
        self._kernel: Callable | bool | None = None  # False: numba is missing
        self._lock = threading.Lock()

    def __call__(self) -> Callable | None:
        if self._kernel is None:
            with self._lock:
                if self._kernel is None:
                    try:
                        self._kernel = _jit(self._define(), self._what)
                    except ImportError as err:
                        log.warning("numba unavailable (%s): %s falls back to torch", err, self._what)
                        self._kernel = False
        return self._kernel or None


def _jit(loop: Callable, what: str) -> Callable:
    import numba

    try:
        compiled = numba.njit(cache=True, **_OPTIONS)(loop)
    except RuntimeError as err:  # no writable place for the cache: compile per process
        log.info("numba cache unavailable (%s); %s compiles in each process", err, what)
        return numba.njit(**_OPTIONS)(loop)
    try:  # numba 0.5x-0.6x keep the stamp an entry must match here
        cache_file = compiled._cache._cache_file
        cache_file._source_stamp = (cache_file._source_stamp, _helpers_stamp())
    except AttributeError:  # another numba: its entries may outlive an edit of the helpers only
        log.info("cannot tie %s's numba cache to its helpers' source", what)
    return compiled


def _helpers_stamp() -> tuple[float, int]:
    """numba_stores.py's modification time and size (what numba stamps a source file with)."""
    st = os.stat(os.path.join(os.path.dirname(__file__), "numba_stores.py"))
    return st.st_mtime, st.st_size
