"""The pack and unpack of a transfer's packed messages with their checksum parts in one pass
(digest.pack_parts / unpack_parts, worker/kv/pack_numba.py on the CPU): the same bytes as the
torch pack and unpack, the same parts as `digest.parts` of the buffer, and the same again
where no fused kernel applies. Messages in place: their parts in one compiled pass
(digest.message_parts, worker/kv/sum_numba.py), taken as each message completes."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import torch

from pdmesh.worker.kv import pack_numba, sum_numba
from pdmesh.worker.kv.pack import pack_checked, unpack_checked
from pdmesh.worker.transfer import digest

SHAPES = [(4, 16, 8, 128), (3, 1, 8, 128), (2, 64, 2, 64), (2, 3, 1, 4), (2, 1, 1, 3)]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)  # bit for bit: random bytes make NaNs, which never compare equal


@pytest.fixture(params=["fused", "fused-streaming", "torch"])
def kernel(request, monkeypatch):
    if request.param == "torch":  # the fallback where numba cannot be imported
        monkeypatch.setattr(pack_numba, "kernel", lambda: None)
    else:  # numba is a declared dependency: the fused loop must be there to be tested
        if request.param == "fused-streaming":  # every unpack as a large one: streaming stores
            monkeypatch.setattr(pack_numba, "STREAMING_MIN_BYTES", 0)
        assert pack_numba.kernel() is not None, "numba did not import: the fused pack is untested"
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pack_and_unpack_with_their_parts(shape, dtype, kernel):
    layers, page, heads, dim = shape
    rng = random.Random(hash((shape, str(dtype))))
    kv = torch.empty((layers, 2, 40, page, heads, dim), dtype=dtype)
    _bytes(kv).random_(generator=torch.Generator().manual_seed(7))
    n = 7
    ids = torch.tensor(rng.sample(range(40), n))
    for a, b in [(0, layers), (1, layers), (0, 1)]:
        staged = (b - a, 2, n, page, heads, dim)
        buf = torch.empty(torch.Size(staged).numel() * kv.element_size(), dtype=torch.uint8)
        sums = digest.pack_parts(kv, ids, a, b, buf)
        expected = torch.empty_like(buf)
        pack_checked(kv, ids, a, b, expected.view(dtype).view(staged))
        assert torch.equal(buf, expected)
        assert torch.equal(sums, digest.parts(expected))

        into = torch.tensor(rng.sample(range(40), n))
        got, want = kv.clone(), kv.clone()
        sums = digest.unpack_parts(buf, got, into, a, b)
        unpack_checked(buf.view(dtype).view(staged), want, into, a, b)
        assert torch.equal(_bytes(got), _bytes(want))
        assert torch.equal(sums, digest.parts(buf))


def test_fused_where_rows_are_whole_words():
    assert pack_numba.kernel() is not None, "numba did not import: the fused pack is untested"
    ids = torch.tensor([1, 2])
    words = torch.zeros((1, 2, 4, 16, 8, 128), dtype=torch.bfloat16)
    assert pack_checked(words, ids, 0, 1, torch.empty_like(words[:, :, :2]), summed=True) is not None
    odd = torch.zeros((1, 2, 4, 1, 1, 3), dtype=torch.bfloat16)  # 6-byte rows: torch then
    assert pack_checked(odd, ids, 0, 1, torch.empty_like(odd[:, :, :2]), summed=True) is None


@pytest.mark.parametrize("faulty", [None, "wrong sums", "raises", "no sums"])
def test_summed_kernels_are_used_only_after_they_agree_with_parts(monkeypatch, faulty):
    """The one-time check that gates the GPU's summed Triton kernels, run here with stand-ins:
    kernels that copy right and sum as `parts` does pass; wrong sums, an error (a kernel that
    fails to compile) or no sums fail, and the transfer then sums in a second pass."""
    def summed(copy):
        def run(*args, summed=False):
            copy(*args)
            if faulty == "raises":
                raise RuntimeError("triton compile error")
            if faulty == "no sums":
                return None
            buf = args[4] if copy is pack_checked else args[0]
            sums = digest.parts(buf.reshape(-1).view(torch.uint8))
            return sums + 1 if faulty == "wrong sums" else sums
        return run

    monkeypatch.setattr(digest, "pack_checked", summed(pack_checked))
    monkeypatch.setattr(digest, "unpack_checked", summed(unpack_checked))
    device = torch.device("cpu")
    digest._summed_kernels_agree.cache_clear()
    try:
        assert digest._summed_kernels_agree(device) is (faulty is None)
    finally:
        digest._summed_kernels_agree.cache_clear()


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("nbytes,offset", [(8, 0), (4096, 0), (4104, 0), (3 * 4096 + 16, 8),
                                           (1 << 20, 0), (4100, 0), (4096, 3), (0, 0)])
def test_message_parts_are_those_of_parts(monkeypatch, compiled, nbytes, offset):
    """One message in place, summed by the compiled loop (kv/sum_numba.py) where it can: whole
    4 KiB blocks, a last partial block, and (the fallback to `parts`) sizes of no whole words,
    misaligned views, no bytes, no numba."""
    if compiled:
        assert sum_numba.kernel() is not None, "numba did not import: the compiled sum is untested"
    else:
        monkeypatch.setattr(sum_numba, "kernel", lambda: None)
    data = torch.empty(nbytes + 16, dtype=torch.uint8).random_(
        generator=torch.Generator().manual_seed(nbytes))[offset:offset + nbytes]
    out = np.zeros((3, 2), dtype=np.uint64)
    digest.message_parts(data, out, 1)
    assert torch.equal(torch.from_numpy(out[1:2].view(np.int64))[0], digest.parts(data))
    assert not out[0].any() and not out[2].any()


def test_message_sums_take_each_message_as_its_request_completes():
    """streams.MessageSums: a message is summed when its request completes (while its bytes are
    in the cache), a failed or cancelled one is not, and `parts()` takes the rest, in order."""
    from pdmesh.worker.transfer.state import TransferStatus
    from pdmesh.worker.transfer.streams import MessageSums

    class Side:  # what MessageSums reads of a runs.PoolSide: a message's block in the pool
        def __init__(self, blocks):
            self.blocks = blocks

        def block(self, i):
            return self.blocks[i]

    blocks = [torch.empty(4096 * k, dtype=torch.uint8).random_() for k in (1, 2, 3, 4)]

    async def go():
        loop = asyncio.get_running_loop()
        sums = MessageSums(Side(blocks), (0, 1, 2, 3), TransferStatus("test", 10.0, {}))
        requests = [loop.create_future() for _ in blocks]
        for i, request in enumerate(requests):
            sums.watch(i, request)
        requests[0].set_result(None)
        requests[1].set_exception(ConnectionError("lost"))
        requests[1].exception()
        requests[2].cancel()
        await asyncio.sleep(0)
        assert sums.taken == [True, False, False, False]
        blocks[0][0] ^= 1  # taken already: the parts are those of the bytes as they were
        want = torch.stack([digest.parts(b) for b in blocks])
        blocks[0][0] ^= 1
        blocks[0][1] ^= 1
        got = sums.parts()
        blocks[0][1] ^= 1
        assert torch.equal(got[1:], want[1:]) and not torch.equal(got[0], want[0])
        assert sums.taken == [True] * 4

    asyncio.run(go())
