"""Fault-injection hooks of a rank process, for the fault tests and `bench/faults.py`. Off by default.

- `PDMESH_DEBUG_PACK_DELAY_S=S` (prefill ranks): before packing each KV chunk the rank logs
  `debug: packing KV chunk layers=[a,b) pages=N` and sleeps S seconds, so a transfer is really in
  flight (the decode has its receives posted) when a test kills the rank or drops its link.
- `PDMESH_DEBUG_FAULTS=1`: SIGUSR1 makes the rank close every UCX link of its data-plane endpoint
  at once, as a dropped connection would (the peer sees its endpoint fail too). The transfers on
  those links fail typed (UNAVAILABLE); nothing else about the rank changes.

Both are read once at rank start (`install`); a production rank sets neither.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from pdmesh.config import env_flag
from pdmesh.errors import Unavailable
from pdmesh.reasons import Reason

log = logging.getLogger(__name__)


def install(transfer, loop: asyncio.AbstractEventLoop) -> None:
    """Apply the hooks the environment asks for to this rank's `RankTransfer`."""
    delay = float(os.environ.get("PDMESH_DEBUG_PACK_DELAY_S") or 0)
    if delay > 0 and transfer.is_prefill:
        _slow_pack(delay)
    if env_flag("DEBUG_FAULTS"):
        loop.add_signal_handler(signal.SIGUSR1, drop_links, transfer)
        log.warning("debug: SIGUSR1 drops every UCX link of this rank (PDMESH_DEBUG_FAULTS)")


def _slow_pack(delay: float) -> None:
    from pdmesh.worker.transfer import samehost_copy, sender

    real, real_copy = sender._pack_chunk, samehost_copy.copy_job

    def copy_job(src_kv, dst_kv, copies, a, b, *rest):  # the same-host path's chunk (CPU)
        log.warning("debug: packing KV chunk layers=[%d,%d) pages=%d (sleeping %.2fs first)",
                    a, b, copies.n, delay)
        time.sleep(delay)
        return real_copy(src_kv, dst_kv, copies, a, b, *rest)

    def pack_chunk(kv, ids, a, b, buf, *rest):
        log.warning("debug: packing KV chunk layers=[%d,%d) pages=%d (sleeping %.2fs first)",
                    a, b, len(ids), delay)
        time.sleep(delay)
        return real(kv, ids, a, b, buf, *rest)

    sender._pack_chunk = pack_chunk
    samehost_copy.copy_job = copy_job
    samehost_copy.INLINE_COPY_BYTES = 0  # a slowed copy runs in a thread, never on the event loop
    log.warning("debug: every KV chunk is packed %.2fs late (PDMESH_DEBUG_PACK_DELAY_S)", delay)


def drop_links(transfer) -> int:
    """Close every UCX link of the rank's data-plane endpoint now; how many were open."""
    end = transfer.sender if transfer.is_prefill else transfer.receiver
    links = list(getattr(end.transport, "_links", ()))
    for link in links:
        link.close(Unavailable(f"the KV link to {link.peer} was dropped (fault injection)",
                               reason=Reason.KV_TRANSFER_LINK_DROPPED, metadata={"peer": link.peer}))
    log.warning("debug: dropped %d UCX link(s)", len(links))
    return len(links)
