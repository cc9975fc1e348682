"""One room's KV offered by a prefill rank: its pages, its layers' readiness, its transfer state.

`KvSender.offer(...)` makes an `Offer` and serves it (sender.py); the prefill reports layers and
the first token on it and awaits it (None once sent, else the typed failure). Made before the
prefill computes (first token None), it is bounded by the request's timeout until `computed()`.
"""

from __future__ import annotations

import asyncio

import numpy as np

from pdmesh.worker.kv.pool import KvPool
from pdmesh.worker.transfer import runs
from pdmesh.worker.transfer.config import TransferConfig
from pdmesh.worker.transfer.layers import LayerReadiness
from pdmesh.worker.transfer.state import TransferState, TransferStatus


class Offer:
    """Room `room`'s KV, held for one decode. Await it: None once sent, else the failure."""

    def __init__(self, room: int, pool: KvPool, page_ids: np.ndarray, first_token: int | None,
                 token: bytes, timeout: float, config: TransferConfig) -> None:
        """`page_ids`: checked (kv.pack.checked_page_array), never written."""
        self.room, self.pool, self.page_ids = room, pool, page_ids
        self.page_runs = runs.page_runs(page_ids)  # the sender's side of every wire plan
        self.token = token
        layers = pool.layout.num_layers
        self.layers = (LayerReadiness(layers) if first_token is None
                       else LayerReadiness.complete(layers, first_token))
        # an offer made before compute is bounded by `timeout` (the request's) until computed,
        # then its transfer by transfer_timeout_s like any other
        self._transfer_timeout_s = config.transfer_timeout_s
        self.status = TransferStatus(f"offer room {room}", timeout, {} if first_token is None else
                                     {TransferState.TRANSFERRING: config.transfer_timeout_s})
        self.status.on_fail(self.layers.fail)
        self.claimed = False
        self._done = asyncio.get_running_loop().create_future()
        self._done.add_done_callback(lambda f: f.cancelled() or f.exception())

    @property
    def state(self) -> TransferState:
        return self.status.state

    @property
    def first_token(self) -> int | None:
        """None until the prefill computed it (an offer made before compute)."""
        return self.layers.first_token

    @property
    def layers_ready(self) -> int:
        """Layers [0, layers_ready) of the pages hold their final KV (layers.py)."""
        return self.layers.count

    def wait_layers(self, n: int, on_host: bool = True) -> asyncio.Future:
        """Resolves once layers [0, n) are final (with their last layer's CUDA event, or None);
        `on_host`: also written (a GPU's event completed), for readers that cannot wait on a
        stream. n == num_layers also means the first token is known. Race it with the transfer:
        `status.guard(...)`."""
        return self.layers.wait(n, on_host=on_host)

    def layer_done(self, layer: int, mark=None) -> None:
        """The prefill wrote layer `layer`'s KV (`mark`: its CUDA event on a GPU)."""
        self.layers.layer_done(layer, mark)

    def computed(self, first_token: int, hold_s: float | None = None) -> None:
        """The prefill ended with `first_token`. `hold_s`: from now, wait at most that long for
        a decode that has not claimed the room yet (its computed room's bound)."""
        self.layers.computed(first_token)
        if self.status.state == TransferState.TRANSFERRING:
            self.status.rebound(self._transfer_timeout_s)
        elif hold_s is not None and not self.claimed:
            self.status.rebound(hold_s)

    def __await__(self):
        return self._done.__await__()

    def _finish(self) -> None:
        if not self._done.done():
            if self.status.error is not None:
                self._done.set_exception(self.status.error)
            else:
                self._done.set_result(None)
