"""The KV data plane: moving a room's KV pages from a prefill rank to a decode rank.

Lifecycle of one transfer (the prefill and decode ranks drive the two ends; the control path, gRPC, carries
the room, the sender's address and epoch, and a random per-transfer token to both ranks):

1. Each rank creates one transport (`make_transport("ucx")`: one UCX worker per process). A
   prefill rank runs a `KvSender` whose `start()` opens the UCX listener and returns the
   address (`ucx://HOST:PORT`) the rank publishes in its instance info.
2. Prefill: once room R's KV is in `pages` of its pool, `offer = sender.offer(R, pool, pages,
   first_token, token=token, timeout=...)`; `await offer`; then free the pages (either way).
   Layer streaming: offer BEFORE computing (`first_token=None`), report each final layer with
   `offer.layer_done(i)` and the end with `offer.computed(first_token)`; chunk i leaves once
   its layers are final (`layers`), the trailer once the first token is known.
3. Decode: `pages = pool.alloc(...)`; `first = await receiver.fetch(address, R, epoch=...,
   pool=pool, page_ids=pages, token=token, timeout=...)`; on failure free the pages.
4. On the wire (protos/pdmesh/transfer/v1/transfer.proto): request (with the receiver's page
   runs) -> status (before any KV moves; a room not offered yet is waited for up to
   `room_wait_s`, then NOT_FOUND; an OK carries the sender's page runs) -> the messages of the
   wire plan (`runs`: page runs both pools share travel in place, one message per layer and
   K/V; the rest packed per chunk of layers; tagged by transfer id and message index; packing
   and unpacking the next chunk overlap the wire) -> trailer (first token, byte count, checksum, token) checked by the
   receiver: any mismatch is DATA_LOSS and nothing is committed.
5. States (`state.TransferState`), each with a deadline: BOOTSTRAPPING (sender: offered, no
   request yet; receiver: connecting, request sent) -> WAITING_FOR_INPUT (receiver: waiting for
   the sender's status) -> TRANSFERRING -> SUCCESS | FAILED. Monotone; failure wins.
6. Aborts travel both ways (`sender.abort(room)`, `receiver.abort(room)`, a deadline, a
   cancelled task); a peer that dies is seen by UCX's endpoint error handling and fails its
   transfers UNAVAILABLE. Neither `await offer` nor `fetch` returns before UCX has finished or
   cancelled every request that touches the pages or their staging buffers, so freeing pages
   right after is always safe.

Modules: `config` (TransferConfig, UCX settings), `wire` (messages, tags, chunk plan,
checksum), `runs` (the wire plan of page runs), `digest` (the checksum computed in place),
`streams` (the send and receive loops), `state`, `link` (the transport interface), `ucx` and
`inproc` (its two backends), `staging` (reused buffers), `layers` (which layers of an offer are
final: layer streaming), `sender`, `receiver`, `samehost` (the
same-host path: the sender maps the receiver's pool, shared memory or CUDA IPC, and writes the
pages straight into it; chosen per link, `TransferConfig.path` / PDMESH_KV_TRANSFER_PATH=ucx
turns it off), `loopback`
(two-process tool for tests and benchmarks).
"""

from pdmesh.worker.transfer.config import TransferConfig, apply_ucx_defaults
from pdmesh.worker.transfer.link import Link, Transport, make_transport
from pdmesh.worker.transfer.receiver import KvReceiver
from pdmesh.worker.transfer.offer import Offer
from pdmesh.worker.transfer.sender import KvSender
from pdmesh.worker.transfer.state import TransferState

__all__ = ["KvReceiver", "KvSender", "Link", "Offer", "TransferConfig", "TransferState",
           "Transport", "apply_ucx_defaults", "make_transport"]
