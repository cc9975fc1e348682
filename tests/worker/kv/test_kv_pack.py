"""pack/unpack (torch reference) against a plain per-page loop, and their validation."""

from __future__ import annotations

import pytest
import torch

from pdmesh.errors import InvalidArgument
from pdmesh.worker.kv.pack import pack, staging_shape, unpack

GEOMETRIES = [  # layers, pages, page_size, heads, head_dim
    (2, 7, 16, 2, 8),
    (3, 9, 1, 1, 3),  # odd piece sizes: 1 * 1 * 3 elements
    (1, 4, 2, 3, 5),
    (4, 12, 1, 8, 16),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _pool(geometry, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layers, pages, size, heads, dim = geometry
    return torch.randn((layers, 2, pages, size, heads, dim), generator=gen).to(dtype)


def _loop_pack(kv, ids, a, b):
    """The obvious reference: for each layer, K then V, page by page."""
    out = torch.empty((b - a, 2, len(ids)) + tuple(kv.shape[3:]), dtype=kv.dtype)
    for layer in range(a, b):
        for side in range(2):
            for i, page in enumerate(ids):
                out[layer - a, side, i] = kv[layer, side, page]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_pack_unpack_match_loop(geometry, dtype):
    kv = _pool(geometry, dtype)
    pages = geometry[1]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randperm(pages, generator=gen)[: pages // 2 + 1].tolist()
    layers = geometry[0]
    for a, b in [(0, layers), (layers // 2, layers), (0, 1)]:
        expected = _loop_pack(kv, ids, a, b)
        got = pack(kv, ids, (a, b))
        assert got.shape == expected.shape == staging_shape(kv, len(ids), (a, b))
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
        # unpack into other pages of another pool: exactly those bytes change
        dest = torch.zeros_like(kv)
        dest_ids = list(reversed(range(pages)))[: len(ids)]
        unpack(got, dest, dest_ids, (a, b))
        check = torch.zeros_like(kv)
        for layer in range(a, b):
            for side in range(2):
                for i, page in enumerate(dest_ids):
                    check[layer, side, page] = got[layer - a, side, i]
        assert torch.equal(dest.view(torch.uint8), check.view(torch.uint8))


def test_pack_into_given_buffer_and_tensor_ids():
    kv = _pool((2, 6, 4, 2, 4), torch.float16)
    ids = torch.tensor([5, 0, 3], dtype=torch.int32)
    out = torch.full((2 * 2 * 3 * 4 * 2 * 4,), 7, dtype=torch.float16)
    got = pack(kv, ids, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, _loop_pack(kv, [5, 0, 3], 0, 2))


def test_bits_survive_exactly():
    """NaN payloads and negative zero come through unchanged (no float arithmetic)."""
    kv = torch.zeros((1, 2, 3, 1, 1, 4), dtype=torch.float32)
    kv.view(torch.int32)[0, 0, 1] = torch.tensor([0x7FC00001, -2147483648, 0x7F800001, 1])
    got = pack(kv, [1])
    assert torch.equal(got.view(torch.int32)[0, 0, 0], kv.view(torch.int32)[0, 0, 1])


def test_empty_requests():
    kv = _pool((2, 4, 2, 1, 2), torch.float32)
    assert pack(kv, []).shape == (2, 2, 0, 2, 1, 2)
    assert pack(kv, [1], (1, 1)).numel() == 0
    before = kv.clone()
    unpack(torch.empty(0), kv, [])
    assert torch.equal(kv, before)


@pytest.mark.parametrize("ids,reason", [
    ([4], "PAGE_ID_OUT_OF_RANGE"),
    ([-1], "PAGE_ID_OUT_OF_RANGE"),
    ([0.5], "INVALID_PAGE_IDS"),
    ([True], "INVALID_PAGE_IDS"),
])
def test_bad_page_ids(ids, reason):
    kv = _pool((2, 4, 2, 1, 2), torch.float32)
    with pytest.raises(InvalidArgument) as info:
        pack(kv, ids)
    assert info.value.reason == reason
    with pytest.raises(InvalidArgument):
        unpack(torch.zeros(2 * 2 * len(ids) * 2 * 1 * 2), kv, ids)


def test_unpack_rejects_repeated_pages_and_changes_nothing():
    kv = _pool((2, 4, 2, 1, 2), torch.float32)
    before = kv.clone()
    with pytest.raises(InvalidArgument) as info:
        unpack(torch.ones(2 * 2 * 2 * 2 * 1 * 2), kv, [1, 1])
    assert info.value.reason == "DUPLICATE_PAGE_IDS"
    assert torch.equal(kv, before)


@pytest.mark.parametrize("layers", [(0, 3), (2, 1), (-1, 1), ("a", 1), 5])
def test_bad_layer_ranges(layers):
    kv = _pool((2, 4, 2, 1, 2), torch.float32)
    with pytest.raises(InvalidArgument) as info:
        pack(kv, [0], layers)
    assert info.value.reason == "INVALID_LAYER_RANGE"


def test_bad_buffers_and_pools():
    kv = _pool((2, 4, 2, 1, 2), torch.float32)
    need = 2 * 2 * 1 * 2 * 1 * 2
    for buf in (torch.zeros(need, dtype=torch.float16), torch.zeros(need + 1),
                torch.zeros(2 * need)[::2]):
        with pytest.raises(InvalidArgument) as info:
            unpack(buf, kv, [0])
        assert info.value.reason == "INVALID_STAGING_BUFFER"
        with pytest.raises(InvalidArgument):
            pack(kv, [0], out=buf)
    for bad in (torch.zeros(2, 4, 2, 1, 2), kv.transpose(3, 5), "kv"):
        with pytest.raises(InvalidArgument) as info:
            pack(bad, [0])
        assert info.value.reason == "INVALID_KV_TENSOR"


def test_checked_page_array_reads_every_kind_of_sequence_and_keeps_none_of_them():
    """The transfer's control path keeps page ids as an int64 array: from a list, a tuple, a
    generator, a numpy array (copied: the caller may reuse it), a tensor; same checks for all."""
    import numpy as np

    from pdmesh.worker.kv.pack import checked_page_array

    kv = torch.empty((1, 2, 600, 1, 1, 2), device="meta")
    for ids in ([3, 1, 2], (3, 1, 2), (i for i in (3, 1, 2)), np.array([3, 1, 2], dtype=np.uint32),
                torch.tensor([3, 1, 2]), [np.int64(3), 1, 2]):
        got = checked_page_array(kv, ids, unique=True)
        assert got.dtype == np.int64 and got.tolist() == [3, 1, 2]
    source = np.array([5, 6])
    got = checked_page_array(kv, source, unique=True)
    source[0] = 9
    assert got.tolist() == [5, 6]
    assert checked_page_array(kv, [], unique=True).tolist() == []


@pytest.mark.parametrize("ids,reason", [
    ([[1, 2]], "INVALID_PAGE_IDS"),  # nested
    (["1"], "INVALID_PAGE_IDS"),
    ([2 ** 70], "INVALID_PAGE_IDS"),  # no integer type holds it
    ([2 ** 63], "PAGE_ID_OUT_OF_RANGE"),  # uint64: wraps negative, refused as out of range
    (list(range(300)) + [7], "DUPLICATE_PAGE_IDS"),  # past the set check: the bitmap's
    ([600], "PAGE_ID_OUT_OF_RANGE"),
])
def test_checked_page_array_refusals(ids, reason):
    from pdmesh.worker.kv.pack import checked_page_array

    kv = torch.empty((1, 2, 600, 1, 1, 2), device="meta")
    with pytest.raises(InvalidArgument) as info:
        checked_page_array(kv, ids, unique=True)
    assert info.value.reason == reason
