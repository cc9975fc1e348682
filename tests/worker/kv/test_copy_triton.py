"""The same-host page copy: the Triton kernel against the torch reference, bit for bit, checksum
included; and the CPU copies (the compiled loop, copy_numba.py, with normal and with streaming
stores, and the torch reference) against plain indexing (this part runs everywhere).
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from pdmesh.worker.kv import copy_numba, page_copy
from pdmesh.worker.kv.page_copy import CopyPlan, checksum_pages, copy_pages

SHAPES = [(4, 1, 2, 64), (3, 16, 2, 8), (2, 64, 1, 16), (5, 3, 1, 6)]  # layers, page, heads, dim
# rows of 8-, 4- and 2-byte checksum words (bf16/fp16: 18 bytes a row)
CPU_SHAPES = SHAPES + [(2, 3, 1, 3)]


def _pools(layers, page, heads, dim, dtype, device, n_src=40, n_dst=50):
    gen = torch.Generator().manual_seed(layers * 1000 + page)
    def pool(pages):
        ints = torch.randint(-2**15, 2**15, (layers, 2, pages, page, heads, dim * 2),
                             generator=gen, dtype=torch.int32).to(torch.int16)
        raw = ints.view(torch.uint8).view(-1)[: layers * 2 * pages * page * heads * dim
                                              * torch.empty((), dtype=dtype).element_size()]
        return raw.clone().view(dtype).view(layers, 2, pages, page, heads, dim).to(device)
    return pool(n_src), pool(n_dst)


def _ids(n, src_pages, dst_pages, seed):
    rng = random.Random(seed)
    src = rng.sample(range(src_pages), n)
    src[n // 2: n // 2 + 3] = [7, 8, 9][: len(src[n // 2: n // 2 + 3])]  # a run, maybe
    return torch.tensor(src), torch.tensor(rng.sample(range(dst_pages), n))


@pytest.mark.parametrize("impl", ["compiled", "compiled-streaming", "torch"])
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_copy_matches_indexing_and_checksum_adds_up(shape, dtype, impl):
    # numba is a dependency (pyproject): a missing compiled copy is a broken install, not a skip
    assert impl == "torch" or copy_numba.kernel() is not None
    copy = {"compiled": copy_pages, "torch": page_copy._copy_torch,
            "compiled-streaming": functools.partial(copy_pages, streaming=True)}[impl]
    src, dst = _pools(*shape, dtype, "cpu")
    before = dst.clone()
    s, d = _ids(12, 40, 50, seed=shape[1])
    plan = CopyPlan(s, d)
    total = 0
    for a, b in ((0, 1), (1, shape[0])):  # any cut into layer ranges adds up
        total += copy(src, dst, plan, a, b)
    expected = before.clone()
    expected[:, :, d] = src[:, :, s]
    assert torch.equal(dst.view(torch.uint8), expected.view(torch.uint8))
    whole = checksum_pages(src, s, 0, shape[0])
    assert total % (1 << 64) == whole == checksum_pages(dst, d, 0, shape[0])
    dst[0, 0, int(d[0])].view(torch.uint8).view(-1)[3] ^= 1  # one changed bit shows
    assert checksum_pages(dst, d, 0, shape[0]) != whole


@pytest.mark.parametrize("dst_offset_bytes", [0, 8, 32])
def test_streaming_copy_by_lines_or_not_wherever_the_pool_starts(dst_offset_bytes):
    """The streaming copy stores whole cache lines only where every destination row starts on
    one; a pool that starts elsewhere (a view 8 or 32 bytes into its memory) takes the word
    loop, with the same bytes and checksum."""
    src, dst = _pools(3, 16, 2, 8, torch.bfloat16, "cpu")  # 512-byte rows: whole lines
    room = torch.zeros(dst.numel() * 2 + 64, dtype=torch.bfloat16)
    start = (-room.data_ptr() % 64 + dst_offset_bytes) // 2
    placed = room[start:start + dst.numel()].view(dst.shape)
    placed.copy_(dst)
    assert placed.data_ptr() % 64 == dst_offset_bytes
    s, d = _ids(12, 40, 50, seed=5)
    total = copy_pages(src, placed, CopyPlan(s, d), 0, 3, streaming=True)
    expected = dst.clone()
    expected[:, :, d] = src[:, :, s]
    assert torch.equal(placed.view(torch.uint8), expected.view(torch.uint8))
    assert total == checksum_pages(src, s, 0, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_copy_is_bit_exact_with_the_same_checksum(shape, dtype):
    from pdmesh.worker.kv.copy_triton import copy_pages_triton
    src, dst = _pools(*shape, dtype, "cuda")
    ref_dst = dst.cpu()
    s, d = _ids(12, 40, 50, seed=shape[1])
    layers = shape[0]
    got = copy_pages_triton(src, dst, s.cuda(), d.cuda(), 1, layers)
    want = copy_pages(src.cpu(), ref_dst, CopyPlan(s, d), 1, layers)
    assert got == want
    assert torch.equal(dst.cpu().view(torch.uint8), ref_dst.view(torch.uint8))
    assert copy_pages_triton(src, dst, s[:0].cuda(), d[:0].cuda(), 0, layers) == 0


@pytest.mark.parametrize("impl", ["compiled", "torch"])
def test_cpu_copy_without_checksum_copies_the_same_bytes(impl):
    """The bench's copy-alone baseline (checksum=False) moves exactly what the checked copy does."""
    # numba is a dependency (pyproject): a missing compiled copy is a broken install, not a skip
    assert impl == "torch" or copy_numba.kernel() is not None
    copy = copy_pages if impl == "compiled" else page_copy._copy_torch
    src, dst = _pools(3, 16, 2, 8, torch.bfloat16, "cpu")
    twin = dst.clone()
    s, d = _ids(12, 40, 50, seed=5)
    plan = CopyPlan(s, d)
    assert copy(src, dst, plan, 0, 3, checksum=False) == 0
    assert copy(src, twin, plan, 0, 3) == checksum_pages(src, s, 0, 3)
    assert torch.equal(dst.view(torch.uint8), twin.view(torch.uint8))
