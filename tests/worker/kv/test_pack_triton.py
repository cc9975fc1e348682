"""The Triton pack/unpack kernels against torch's indexing, bit for bit; their summed variants
also against `digest.parts` of the staging buffer, taken in the same pass.

They run on a CUDA device. Without one they are skipped, except that with `TRITON_INTERPRET=1`
set and triton installed they run on CPU tensors in Triton's interpreter (a development aid:
`TRITON_INTERPRET=1 pytest tests/worker/kv/test_pack_triton.py`).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from pdmesh.worker.transfer import digest

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton"):
    DEVICE = "cpu"
else:
    DEVICE = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="no CUDA device here (the Triton kernels need one; "
                       "TRITON_INTERPRET=1 with triton installed runs them in the interpreter)"),
]

INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(scope="module")
def kernels():
    from pdmesh.worker.kv import pack_triton
    return pack_triton


def random_bits(shape, dtype, gen) -> torch.Tensor:
    """Any bit pattern, NaN payloads and negative zeros included; never zeros throughout."""
    size = torch.empty((), dtype=dtype).element_size()
    bits = torch.randint(-(1 << 15), 1 << 15, shape, generator=gen, dtype=torch.int64)
    if size == 4:
        bits = bits * 65536 + torch.randint(0, 1 << 16, shape, generator=gen, dtype=torch.int64)
    return bits.to(INTS[size]).view(dtype).to(DEVICE)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = INTS[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


def make_pool(layers, pages, page_size, heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return random_bits((layers, 2, pages, page_size, heads, head_dim), dtype, gen), gen


def check_roundtrip(kernels, kv, ids, a, b, gen):
    ids = torch.tensor(ids, dtype=torch.int64, device=DEVICE)
    out = random_bits((b - a, 2, len(ids)) + tuple(kv.shape[3:]), kv.dtype, gen)  # poisoned
    assert kernels.pack_triton(kv, ids, a, b, out) is out
    assert same_bits(out, kv[a:b, :, ids].contiguous())

    staging = random_bits(out.shape, kv.dtype, gen)
    pool, expected = kv.clone(), kv.clone()
    kernels.unpack_triton(staging, pool, ids, a, b)
    for layer in range(a, b):
        for half in (0, 1):
            expected[layer, half].index_copy_(0, ids, staging[layer - a, half])
    assert same_bits(pool, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("heads,head_dim", [(2, 128), (3, 5)])
def test_bit_exact_against_torch(kernels, dtype, page_size, heads, head_dim):
    kv, gen = make_pool(4, 9, page_size, heads, head_dim, dtype, seed=page_size + head_dim)
    check_roundtrip(kernels, kv, [8, 0, 3, 5, 1], 0, 4, gen)  # both ends of the pool, any order
    check_roundtrip(kernels, kv, [4, 2, 7], 1, 3, gen)  # a chunk: a range of layers


@pytest.mark.parametrize("ids", [[0], [8], [3]])
def test_single_page_requests(kernels, ids):
    kv, gen = make_pool(3, 9, 16, 2, 64, torch.bfloat16, seed=ids[0])
    check_roundtrip(kernels, kv, ids, 0, 3, gen)
    check_roundtrip(kernels, kv, ids, 2, 3, gen)


def test_many_pages_uneven_tiles(kernels):
    """More rows than one program takes, a row count no tile divides, every page of the pool."""
    kv, gen = make_pool(3, 97, 1, 1, 7, torch.float16, seed=7)
    ids = torch.randperm(97, generator=gen).tolist()
    check_roundtrip(kernels, kv, ids, 0, 3, gen)
    check_roundtrip(kernels, kv, ids[:50], 1, 2, gen)


@pytest.mark.parametrize("ids,a,b", [([], 0, 4), ([2, 1], 2, 2), ([], 3, 3)])
def test_empty_requests_touch_nothing(kernels, ids, a, b):
    kv, gen = make_pool(4, 5, 16, 2, 8, torch.float32, seed=3)
    before = kv.clone()
    page_ids = torch.tensor(ids, dtype=torch.int64, device=DEVICE)
    out = torch.empty((b - a, 2, len(ids), 16, 2, 8), dtype=kv.dtype, device=DEVICE)
    assert kernels.pack_triton(kv, page_ids, a, b, out) is out
    kernels.unpack_triton(out, kv, page_ids, a, b)
    assert same_bits(kv, before)


def test_refuses_what_would_write_out_of_bounds(kernels):
    kv, gen = make_pool(2, 4, 16, 2, 8, torch.float16, seed=5)
    ids = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="staging must be"):
        kernels.pack_triton(kv, ids, 0, 2, torch.empty(1, 2, 2, 16, 2, 8, dtype=kv.dtype, device=DEVICE))
    with pytest.raises(ValueError, match="staging must be"):
        kernels.unpack_triton(torch.empty(2, 2, 2, 16, 2, 8, dtype=torch.float32, device=DEVICE),
                              kv, ids, 0, 2)
    with pytest.raises(ValueError, match="layer range"):
        kernels.pack_triton(kv, ids, 1, 3, torch.empty(2, 2, 2, 16, 2, 8, dtype=kv.dtype, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        out = torch.empty(2, 2, 2, 16, 2, 16, dtype=kv.dtype, device=DEVICE)[..., :8]
        kernels.pack_triton(kv, ids, 0, 2, out)


@pytest.mark.skipif(DEVICE != "cuda", reason="a 4.3 GB pool: only on the GPU, not in the interpreter")
def test_offsets_past_two_to_the_31_elements(kernels):
    """A pool of more than 2^31 elements: the last pages are reached only with int64 offsets."""
    pages = (1 << 31) // (2 * 2 * 16 * 8 * 128) + 2
    kv = torch.empty((2, 2, pages, 16, 8, 128), dtype=torch.float16, device=DEVICE)
    assert kv.numel() > 1 << 31
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    ids = torch.tensor([pages - 1, 0, pages - 2], device=DEVICE)
    kv.view(torch.int16)[:, :, ids] = torch.randint(-(1 << 15), 1 << 15, (2, 2, 3, 16, 8, 128),
                                                    generator=gen, device=DEVICE, dtype=torch.int16)
    cpu_gen = torch.Generator().manual_seed(12)
    check_roundtrip(kernels, kv, ids.tolist(), 0, 2, cpu_gen)
    del kv
    torch.cuda.empty_cache()


@pytest.mark.skipif(DEVICE != "cuda", reason="the public API hands only CUDA tensors to Triton")
def test_public_api_hands_cuda_tensors_to_the_kernels(kernels, monkeypatch):
    from pdmesh.worker.kv import pack as api
    calls = []
    for name in ("pack_triton", "unpack_triton"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    kv, gen = make_pool(3, 9, 16, 2, 128, torch.bfloat16, seed=13)
    ids = [6, 0, 8]
    staging = api.pack(kv, torch.tensor(ids, device=DEVICE), layers=(1, 3))
    assert same_bits(staging, kv[1:3, :, ids].contiguous())
    expected = kv.clone()
    expected[1:3, :, ids] = staging.flip(0)
    api.unpack(staging.flip(0).contiguous(), kv, ids, layers=(1, 3))
    assert same_bits(kv, expected)
    assert calls == ["pack_triton", "unpack_triton"]


# -- the summed variants (pack_triton_summed / unpack_triton_summed) ----------------------------

def random_bytes(shape, dtype, gen) -> torch.Tensor:
    """Every bit pattern: the words span all of int64, negative and near the ends included."""
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).random_(generator=gen)
    return t.to(DEVICE)


def expected_parts(t: torch.Tensor) -> torch.Tensor:
    return digest.parts(t.view(torch.uint8))


def check_summed(kernels, kv, ids, a, b, gen, **tuning):
    """Pack and unpack with sums: bytes as torch's, parts as digest's; returns the pack's sums."""
    ids = torch.tensor(ids, dtype=torch.int64, device=DEVICE)
    out = random_bytes((b - a, 2, len(ids)) + tuple(kv.shape[3:]), kv.dtype, gen)  # poisoned
    sums = kernels.pack_triton_summed(kv, ids, a, b, out, **tuning)
    assert same_bits(out, kv[a:b, :, ids].contiguous())
    assert sums is not None and sums.dtype == torch.int64 and sums.shape == (2,)
    assert sums.device == out.device
    assert torch.equal(sums, expected_parts(out))

    staging = random_bytes(out.shape, kv.dtype, gen)
    pool, expected = kv.clone(), kv.clone()
    sums = kernels.unpack_triton_summed(staging, pool, ids, a, b, **tuning)
    for layer in range(a, b):
        for half in (0, 1):
            expected[layer, half].index_copy_(0, ids, staging[layer - a, half])
    assert same_bits(pool, expected)
    assert sums is not None and torch.equal(sums, expected_parts(staging))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("heads,head_dim", [(2, 128), (3, 4)])
def test_sums_and_bytes_against_torch_and_digest(kernels, dtype, page_size, heads, head_dim):
    """Rows of many 512-word blocks, and many rows to a block (a block straddles rows)."""
    gen = torch.Generator().manual_seed(page_size * 7 + head_dim)
    kv = random_bytes((4, 2, 11, page_size, heads, head_dim), dtype, gen)
    for a, b in ((0, 4), (1, 3), (3, 4)):
        n = int(torch.randint(1, 12, (), generator=gen))
        ids = torch.randperm(11, generator=gen)[:n].tolist()
        check_summed(kernels, kv, ids, a, b, gen)


@pytest.mark.parametrize("tile_bytes", [256, 4096])
def test_tiles_that_split_rows_and_blocks(kernels, tile_bytes):
    """Programs that each take part of a row, and rows no tile divides: every tile's slot counts."""
    gen = torch.Generator().manual_seed(tile_bytes)
    kv = random_bytes((3, 2, 13, 16, 3, 24), torch.bfloat16, gen)  # 288 words a row: masked tiles
    check_summed(kernels, kv, torch.randperm(13, generator=gen).tolist(), 0, 3, gen,
                 tile_bytes=tile_bytes)
    check_summed(kernels, kv, [12, 0, 5], 1, 2, gen, tile_bytes=tile_bytes)


def test_many_one_word_rows(kernels):
    """More rows than one program takes, a row count no tile divides: one word a row."""
    gen = torch.Generator().manual_seed(7)
    kv = random_bytes((3, 2, 700, 1, 1, 4), torch.float16, gen)
    check_summed(kernels, kv, torch.randperm(700, generator=gen)[:613].tolist(), 0, 3, gen)


@pytest.mark.parametrize("word", [(1 << 63) - 1, -(1 << 63), -1])
def test_sums_wrap_mod_two_to_the_64(kernels, word):
    kv = torch.full((2, 2, 5, 16, 2, 64), word, dtype=torch.int64).view(torch.float32)
    kv = kv.view(2, 2, 5, 16, 2, 128).to(DEVICE)
    check_summed(kernels, kv, [4, 0, 2, 1, 3], 0, 2, torch.Generator().manual_seed(1))


def test_rows_not_whole_words_give_none_and_copy(kernels):
    """30-byte rows: no int64 words to sum, so None (the caller runs digest.parts); the copy is
    done all the same."""
    gen = torch.Generator().manual_seed(3)
    kv = random_bytes((3, 2, 6, 1, 3, 5), torch.float16, gen)
    ids = torch.tensor([5, 1, 3], device=DEVICE)
    out = torch.empty((2, 2, 3, 1, 3, 5), dtype=kv.dtype, device=DEVICE)
    assert kernels.pack_triton_summed(kv, ids, 1, 3, out) is None
    assert same_bits(out, kv[1:3, :, ids].contiguous())
    pool = kv.clone()
    assert kernels.unpack_triton_summed(out.flip(0).contiguous(), pool, ids, 1, 3) is None
    expected = kv.clone()
    expected[1:3, :, ids] = out.flip(0)
    assert same_bits(pool, expected)


def test_misaligned_staging_gives_none_and_copy(kernels):
    gen = torch.Generator().manual_seed(4)
    kv = random_bytes((2, 2, 4, 16, 2, 8), torch.float16, gen)
    ids = torch.tensor([3, 0], device=DEVICE)
    shape = (2, 2, 2, 16, 2, 8)
    out = torch.empty(kv[:, :, :2].numel() + 1, dtype=kv.dtype, device=DEVICE)[1:].view(shape)
    assert out.data_ptr() % 8
    assert kernels.pack_triton_summed(kv, ids, 0, 2, out) is None
    assert same_bits(out, kv[:, :, ids].contiguous())
    assert kernels.unpack_triton_summed(out, kv.clone(), ids, 0, 2) is None


@pytest.mark.parametrize("ids,a,b", [([], 0, 4), ([2, 1], 2, 2)])
def test_empty_requests_sum_to_zero(kernels, ids, a, b):
    kv = random_bytes((4, 2, 5, 8, 2, 8), torch.float32, torch.Generator().manual_seed(5))
    before = kv.clone()
    page_ids = torch.tensor(ids, dtype=torch.int64, device=DEVICE)
    out = torch.empty((b - a, 2, len(ids), 8, 2, 8), dtype=kv.dtype, device=DEVICE)
    zeros = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    assert torch.equal(kernels.pack_triton_summed(kv, page_ids, a, b, out), zeros)
    assert torch.equal(kernels.unpack_triton_summed(out, kv, page_ids, a, b), zeros)
    assert torch.equal(expected_parts(out), zeros)
    assert same_bits(kv, before)


def test_plain_and_summed_pack_agree(kernels):
    """The word-view kernel moves the same bytes as the element-view one."""
    gen = torch.Generator().manual_seed(9)
    kv = random_bytes((3, 2, 9, 16, 2, 128), torch.bfloat16, gen)
    ids = torch.tensor([6, 0, 8, 2], device=DEVICE)
    plain = kernels.pack_triton(kv, ids, 0, 3, torch.empty_like(kv[:, :, :4]))
    summed = torch.empty_like(plain)
    kernels.pack_triton_summed(kv, ids, 0, 3, summed)
    assert same_bits(plain, summed)


def test_summed_refuses_what_would_write_out_of_bounds(kernels):
    kv = torch.zeros((2, 2, 4, 16, 2, 8), dtype=torch.float16, device=DEVICE)
    ids = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="staging must be"):
        kernels.pack_triton_summed(kv, ids, 0, 2, torch.empty(1, 2, 2, 16, 2, 8, dtype=kv.dtype,
                                                              device=DEVICE))
    with pytest.raises(ValueError, match="layer range"):
        kernels.unpack_triton_summed(torch.empty(2, 2, 2, 16, 2, 8, dtype=kv.dtype, device=DEVICE),
                                     kv, ids, 1, 3)
