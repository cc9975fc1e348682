"""The pack and unpack of a transfer's packed messages with their checksum parts in one pass
(digest.pack_parts / unpack_parts, worker/kv/pack_numba.py on the CPU): the same bytes as the
torch pack and unpack, the same parts as `digest.parts` of the buffer, and the same again
where no fused kernel applies."""

from __future__ import annotations

import random

import pytest
import torch

from pdmesh.worker.kv import pack_numba
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
