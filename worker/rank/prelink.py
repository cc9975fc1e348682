"""Pre-linking on a decode rank: the KV links to prefill ranks wired before a request needs them.

A decode's first fetch from a prefill rank used to open the link on the request path: a UCX
connect and wire-up, the same-host hello and the mapping of this rank's pool in the prefill rank
(on this machine 10 + 3 ms, and a first copy into a fresh mapping; the first request of a fresh
mesh paid it after the prefill's compute, 13.7 against 1.2 ms of transfer after compute in the
steady state). The `Prelinker` does that ahead of time, in the background, for every rank of a
prefill instance it learns of:

- from the instance info a request made this rank fetch (`InstanceInfoCache`'s `on_info`): the
  instance's other ranks are linked before requests reach them;
- with a bootstrap address (`pdmesh decode --bootstrap-addr`, PDMESH_BOOTSTRAP_ADDR), from the
  bootstrap's list of instances: once before the rank reports ready (bounded by
  `FIRST_POLL_S`), then every `POLL_S`. Their infos also go into the cache, so the first
  request to such an instance makes no GetInstance call either.

A link that fails to open is logged and tried again when the instance is seen again; the request
path still opens links itself and reports its own failures (pre-linking only saves time). An
instance whose KV layout differs from this rank's is skipped (its requests fail typed anyway).
"""

from __future__ import annotations

import asyncio
import logging

from pdmesh.errors import PdmeshError
from pdmesh.worker.kv.layout import KvLayout

log = logging.getLogger(__name__)

#: Seconds between two looks at the bootstrap's list of instances.
POLL_S = 2.0
#: At most this long, before the rank reports ready, for the first look and the links it opens.
FIRST_POLL_S = 5.0


class Prelinker:
    """Links this decode rank to the ranks of every prefill instance it learns of."""

    def __init__(self, transfer, layout: KvLayout, infos, bootstrap=None) -> None:
        self.transfer, self.layout, self.infos, self.bootstrap = transfer, layout, infos, bootstrap
        self._pending: dict[str, asyncio.Task] = {}
        self._watch: asyncio.Task | None = None

    def instance(self, info) -> list[asyncio.Task]:
        """Link to every rank of `info` not linked or being linked; the tasks it started."""
        try:
            KvLayout.from_proto(info.kv_layout).check_compatible(self.layout)
        except PdmeshError:
            return []
        started = []
        for endpoint in info.rank_endpoints:
            address = endpoint.transfer_address
            if address and address not in self._pending and not self.transfer.linked(address):
                task = self._pending[address] = asyncio.ensure_future(self._link(address))
                task.add_done_callback(lambda _, a=address: self._pending.pop(a, None))
                started.append(task)
        return started

    async def _link(self, address: str) -> None:
        try:
            same_host = await self.transfer.prelink(address)
            log.info("pre-linked prefill rank %s (%s)", address,
                     "same host: KV is written straight into this rank's pool" if same_host else "UCX")
        except Exception as err:  # noqa: BLE001 - best effort: a request links and reports itself
            log.info("pre-linking prefill rank %s failed (a request links again): %s", address, err)

    async def start(self) -> None:
        """With a bootstrap: look once (bounded by FIRST_POLL_S, links included), then keep
        looking every POLL_S in the background."""
        if self.bootstrap is None:
            return
        try:
            await asyncio.wait_for(self._poll(wait_links=True), FIRST_POLL_S)
        except (asyncio.TimeoutError, PdmeshError) as err:
            log.info("pre-linking: the first look at %s did not finish: %r", self.bootstrap.address, err)
        self._watch = asyncio.ensure_future(self._keep_polling())

    async def _keep_polling(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self._poll(wait_links=False)
            except PdmeshError as err:
                log.debug("pre-linking: listing instances at %s failed: %s", self.bootstrap.address, err)

    async def _poll(self, wait_links: bool) -> None:
        started = []
        for info in await self.bootstrap.list_instances():
            self.infos.put(self.bootstrap.address, info)
            started += self.instance(info)
        if wait_links and started:
            await asyncio.wait(started)

    async def close(self) -> None:
        tasks = [t for t in (self._watch, *self._pending.values()) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
