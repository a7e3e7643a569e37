"""Bitmap compression (triton_kernels/bitmap.py, reference/bitmap.py): the kernels through the public ops under the
interpreter, bit-identical to the reference (values, bitmap, offsets), exact round trips for every sparsity and
special values (-0.0, NaN payloads, infinities, subnormals), the reference on a hand-packed example, opcheck and
the ops' argument errors. Values are compared as bits: torch.equal calls -0.0 and +0.0 equal and NaN unequal."""

import pytest
import torch

from sparsekern import ops, reference
from sparsekern.reference.bitmap import int_view

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(5, 123), (7, 257), (1, 1), (9, 300)]  # K not a multiple of 32 or 128; tiles of 128 across programs


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 rows x one 128-column tile: odd shapes then span several programs along both axes."""
    from sparsekern.triton_kernels import bitmap

    monkeypatch.setattr(bitmap, "INTERPRETER_TILES", (4, 1))


kernels = pytest.mark.usefixtures("interpret", "poisoned_outputs", "small_tiles")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sparse_weight(shape, dtype, sparsity, seed=0, empty_rows=()):
    w = torch.randn(shape, generator=gen(seed)).to(dtype)
    w = w.masked_fill(torch.rand(shape, generator=gen(seed + 1)) < sparsity, 0)
    w[list(empty_rows)] = 0
    return w


def special_weight(dtype):
    """[3, 140]: -0.0 (kept), NaN with a payload, +/-inf, the smallest subnormal, +0.0 (not kept), a full and an
    empty 32-column word, and an empty row."""
    w = torch.zeros(3, 140, dtype=dtype)
    w[0, :32] = 1.5  # a full word
    w[0, 40] = -0.0
    w[0, 41] = float("inf")
    w[0, 42] = float("-inf")
    w[0, 43] = float("nan")
    w[0, 139] = -2.0  # the last column, past the last full word
    w[2, 0] = torch.finfo(dtype).tiny / 4  # a subnormal
    w[2, 127], w[2, 128] = -0.0, 3.0  # both sides of a 128-column tile boundary
    bits = int_view(w)
    bits[2, 5] = bits[0, 43] ^ 1  # another NaN: a different payload
    return w


def assert_same_bits(got, expected, what):
    assert got.shape == expected.shape and got.dtype == expected.dtype, \
        f"{what}: {got.dtype} {tuple(got.shape)} != {expected.dtype} {tuple(expected.shape)}"
    differ = int_view(got) != int_view(expected) if got.is_floating_point() else got != expected
    assert not differ.any(), f"{what}: {int(differ.sum())} elements differ, first at " \
                             f"{tuple(differ.nonzero()[0].tolist())}"


def check(weight):
    """The ops (active backend) against the reference, bit for bit, and an exact round trip."""
    values, bitmap, offsets = ops.compress_bitmap(weight)
    expected = reference.compress_bitmap(weight)
    for got, exp, what in zip((values, bitmap, offsets), expected, ("values", "bitmap", "offsets")):
        assert_same_bits(got, exp, what)
    kept = int_view(weight) != 0
    assert values.numel() == int(kept.sum())
    dense = ops.decompress_bitmap(values, bitmap, offsets, weight.shape[1])
    assert_same_bits(dense, weight.contiguous(), "round trip")
    return values, bitmap, offsets


@kernels
def test_ops_reach_the_kernels():
    from sparsekern.triton_kernels import bitmap

    w = torch.zeros(2, 4)
    assert ops._implementation("compress_bitmap", w) is bitmap.compress_bitmap
    assert ops._implementation("decompress_bitmap", w) is bitmap.decompress_bitmap


@kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_reference(shape, dtype):
    for sparsity in (0.0, 0.5, 0.9, 1.0):
        check(sparse_weight(shape, dtype, sparsity, seed=shape[1], empty_rows=[0] if sparsity == 0.5 else []))


@pytest.mark.parametrize("backend", ["torch", "interpret"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_bit_exact(backend, dtype, request):
    if backend == "interpret":
        for fixture in ("interpret", "poisoned_outputs", "small_tiles"):
            request.getfixturevalue(fixture)
    w = special_weight(dtype)
    values, bitmap, offsets = check(w)
    assert values.numel() == 37 + 4
    assert offsets.tolist() == [[0, 36], [37, 37], [37, 40]]  # row 0: 36 kept before column 128, then column 139


@kernels
def test_non_contiguous_weight_and_compressed_tensors():
    base = sparse_weight((12, 300), torch.float16, 0.6, seed=3)
    weight = base[::2, 7:250]  # row stride 600, a column offset
    values, bitmap, offsets = check(weight)
    transposed = torch.empty(weight.shape[1], weight.shape[0], dtype=weight.dtype).T  # strides (1, rows)
    transposed.copy_(weight)
    check(transposed)
    strided_bitmap, strided_offsets = bitmap.T.contiguous().T, offsets.T.contiguous().T
    strided_values = torch.zeros(2 * values.numel(), dtype=values.dtype)[::2]
    strided_values.copy_(values)
    assert_same_bits(ops.decompress_bitmap(strided_values, strided_bitmap, strided_offsets, weight.shape[1]),
                     weight.contiguous(), "decompressed from strided tensors")


@kernels
def test_fp64_and_one_byte_floats():
    check(sparse_weight((3, 70), torch.float64, 0.5, seed=4))
    if hasattr(torch, "float8_e4m3fn"):
        check(sparse_weight((3, 70), torch.float32, 0.5, seed=5).to(torch.float8_e4m3fn))


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_empty(backend, request):
    if backend == "interpret":
        request.getfixturevalue("interpret")
    for shape in [(0, 5), (3, 0), (0, 0)]:
        values, bitmap, offsets = ops.compress_bitmap(torch.zeros(shape))
        assert values.shape == (0,)
        assert bitmap.shape == (shape[0], -(-shape[1] // 32)) and offsets.shape == (shape[0], -(-shape[1] // 128))
        assert ops.decompress_bitmap(values, bitmap, offsets, shape[1]).shape == shape


def test_tiles_of_the_interpreter_default(interpret, poisoned_outputs):
    check(sparse_weight((70, 600), torch.bfloat16, 0.7, seed=6))  # 2 x 2 programs of 64 rows x 512 columns


# -- the op layer: opcheck and argument errors ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_opcheck(backend, request):
    if backend == "interpret":
        request.getfixturevalue("interpret")
    weight = sparse_weight((5, 140), torch.float16, 0.5, seed=7)
    # compress_bitmap's fake makes values' size a new unbacked symbol (data-dependent); opcheck's fake-tensor and
    # AOT-dispatch (dynamic) checks handle that, so every default check runs.
    torch.library.opcheck(ops.compress_bitmap, (weight,))
    torch.library.opcheck(ops.decompress_bitmap, (*reference.compress_bitmap(weight), 140))


def test_arguments_checked():
    values, bitmap, offsets = reference.compress_bitmap(sparse_weight((4, 100), torch.float32, 0.5))
    with pytest.raises(ValueError, match=r"weight must be 2-D \[N, K\], got shape \(2, 3, 4\)"):
        ops.compress_bitmap(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="weight must be a float tensor"):
        ops.compress_bitmap(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"values must be a 1-D float tensor \[nnz\]"):
        ops.decompress_bitmap(values.reshape(1, -1), bitmap, offsets, 100)
    with pytest.raises(ValueError, match=r"bitmap must be int32"):
        ops.decompress_bitmap(values, bitmap.long(), offsets, 100)
    with pytest.raises(ValueError, match=r"bitmap has shape \(4, 4\), expected \(4, 5\) for in_features = 130"):
        ops.decompress_bitmap(values, bitmap, offsets, 130)
    with pytest.raises(ValueError, match=r"offsets must be int32 \(4, 1\) .* got torch.int32 \(4, 2\)"):
        ops.decompress_bitmap(values, bitmap, torch.zeros(4, 2, dtype=torch.int32), 100)


def test_nnz_limit_is_a_clear_error():
    with pytest.raises(ValueError, match=r"2\*\*31 - 1 values: split the weight"):
        reference.bitmap.check_nnz(2**31)
    reference.bitmap.check_nnz(2**31 - 1)


# -- the reference alone -------------------------------------------------------------------------------------


def test_reference_packs_by_hand():
    weight = torch.zeros(2, 160)
    weight[0, [0, 3, 31, 32, 130]] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    weight[1, [1, 159]] = torch.tensor([6.0, -0.0])
    values, bitmap, offsets = reference.compress_bitmap(weight)
    assert values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, -0.0]
    assert bitmap.dtype == torch.int32
    assert bitmap.tolist() == [[1 | 8 | -2**31, 1, 0, 0, 4], [2, 0, 0, 0, -2**31]]
    assert offsets.dtype == torch.int32 and offsets.tolist() == [[0, 4], [5, 6]]
    assert_same_bits(reference.decompress_bitmap(values, bitmap, offsets, 160), weight, "round trip")
