"""2:4 compression (triton_kernels/sparse24.py, reference/sparse24.py): the kernels through the public ops under
the interpreter, bit-identical to the reference (values and meta), exact round trips, and the reference alone on a
hand-packed example. Values are compared as bits: torch.equal calls -0.0 and +0.0 equal and NaN unequal."""

import pytest
import torch

from sparsekern import ops, reference
from sparsekern.reference.masks import nm_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 4), (5, 36), (37, 260), (3, 1028)]  # K not a multiple of 32: the last meta word is padded
kernels = pytest.mark.usefixtures("interpret", "poisoned_outputs", "small_tiles")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 rows x 16 groups (2 meta words): odd shapes then span several programs along both axes."""
    from sparsekern.triton_kernels import sparse24

    monkeypatch.setattr(sparse24, "INTERPRETER_TILES", (8, 16))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def bits(t):
    """The raw bits of a float tensor, so that equality sees -0.0 vs +0.0 and NaN payloads."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same_bits(got, expected, what):
    assert got.shape == expected.shape and got.dtype == expected.dtype, \
        f"{what}: {got.dtype} {tuple(got.shape)} != {expected.dtype} {tuple(expected.shape)}"
    differ = bits(got) != bits(expected) if got.is_floating_point() else got != expected
    assert not differ.any(), f"{what}: {int(differ.sum())} elements differ, first at " \
                             f"{tuple(differ.nonzero()[0].tolist())}"


def random_24(shape, dtype, seed):
    """A random 2:4 weight whose groups hold 2, 1 or 0 nonzeros; some of its zeros are -0.0 (as w * mask gives)."""
    w = torch.randn(shape, generator=gen(seed)).to(dtype)
    w = w.masked_fill(nm_mask(w.abs(), 2, 4), 0)
    w = w.masked_fill(torch.rand(shape, generator=gen(seed + 1)) < 0.3, 0)
    return torch.where((w == 0) & (torch.rand(shape, generator=gen(seed + 2)) < 0.5), -0.0, w)


def every_pattern(dtype):
    """[3, 44]: each row holds the 11 groups with at most 2 nonzeros (none; one at 0..3; each pair), in a
    different order per row, free positions -0.0 in row 1."""
    patterns = [()] + [(p,) for p in range(4)] + [(p, q) for p in range(4) for q in range(p + 1, 4)]
    rows = []
    for row in range(3):
        groups = []
        for i in torch.randperm(len(patterns), generator=gen(row)).tolist():
            group = torch.full((4,), -0.0 if row == 1 else 0.0)
            for p in patterns[i]:
                group[p] = 1.5 + p - 4 * (i % 2)
            groups.append(group)
        rows.append(torch.cat(groups))
    return torch.stack(rows).to(dtype)


def check_kernels(weight):
    """ops.compress_24 / decompress_24 on the kernels: bit-identical to the reference, and an exact round trip."""
    values, meta = ops.compress_24(weight)
    expected_values, expected_meta = reference.compress_24(weight)
    assert_same_bits(values, expected_values, "values")
    assert_same_bits(meta, expected_meta, "meta")
    assert values.is_contiguous() and meta.is_contiguous()
    dense = ops.decompress_24(values, meta)
    assert_same_bits(dense, reference.decompress_24(values, meta), "decompressed")
    # W itself, except that -0.0 at a free position that was not kept comes back as +0.0 (nothing records it).
    assert_same_bits(dense, torch.where(weight == 0, dense, weight), "round trip (nonzeros)")
    torch.testing.assert_close(dense, weight, rtol=0, atol=0, equal_nan=True)
    return values, meta


# -- the kernels ---------------------------------------------------------------------------------------------


@kernels
def test_ops_reach_the_kernels():
    from sparsekern.triton_kernels import sparse24

    w = torch.zeros(2, 4)
    assert ops._implementation("compress_24", w) is sparse24.compress_24
    assert ops._implementation("decompress_24", w) is sparse24.decompress_24


@kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_random_24_matches_reference(shape, dtype):
    check_kernels(random_24(shape, dtype, seed=shape[1]))


@kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_group_pattern(dtype):
    values, _ = check_kernels(every_pattern(dtype))
    # Free positions keep their -0.0 bits when kept as filler (row 1), like the reference's gather.
    assert (bits(values[1]) == bits(torch.tensor(-0.0, dtype=dtype))).any()


@kernels
def test_nan_and_infinities_are_moved_bit_for_bit():
    weight = torch.tensor([[float("nan"), 0.0, 0.0, float("-inf"), 0.0, float("inf"), -0.0, 0.0]])
    values, _ = check_kernels(weight)  # groups kept at (0, 3) and (0, 1)
    assert torch.isnan(values[0, 0]) and values[0, 1] == float("-inf") and values[0, 3] == float("inf")


@kernels
@pytest.mark.parametrize("layout", ["transposed", "column_slice"])
def test_non_contiguous_weight(layout):
    if layout == "transposed":
        weight = torch.empty(36, 11, dtype=torch.float16).T  # [11, 36], strides (1, 11)
        weight.copy_(random_24((11, 36), torch.float16, seed=4))
    else:
        base = torch.zeros(6, 48, dtype=torch.bfloat16)
        base[:, 4:40] = random_24((6, 36), torch.bfloat16, seed=5)
        base[:, :4] = base[:, 40:] = 7.0  # dense columns outside the view: a wrong stride picks them up
        weight = base[:, 4:40]
    assert not weight.is_contiguous()
    check_kernels(weight)


@kernels
def test_decompress_non_contiguous_values_and_meta():
    values, meta = reference.compress_24(random_24((9, 100), torch.float32, seed=6))
    strided_values, strided_meta = values.T.contiguous().T, meta.T.contiguous().T
    assert not strided_values.is_contiguous() and not strided_meta.is_contiguous()
    assert_same_bits(ops.decompress_24(strided_values, strided_meta), reference.decompress_24(values, meta),
                     "decompressed from strided values and meta")


@kernels
@pytest.mark.parametrize("cols", [4, 28, 32, 36, 92])  # 1, 7, 8, 9, 23 groups
def test_meta_fully_written_and_padding_zero(cols):
    # Poisoned outputs: a meta word left unwritten reads 0x7F7F7F7F, a value NaN.
    weight = random_24((10, cols), torch.float16, seed=cols)
    _, meta = check_kernels(weight)
    assert meta.shape == (10, -(-cols // 32))
    unused = 4 * ((cols // 4) % 8)
    if unused:
        assert (meta[:, -1] >> unused == 0).all(), "the last word's padding nibbles must be 0"


@kernels
def test_tiles_of_the_interpreter_default(monkeypatch):
    from sparsekern.triton_kernels import sparse24

    monkeypatch.setattr(sparse24, "INTERPRETER_TILES", (64, 256))  # one program for the whole matrix
    check_kernels(random_24((37, 260), torch.float32, seed=7))


@kernels
def test_empty():
    for shape in [(0, 8), (3, 0)]:
        values, meta = ops.compress_24(torch.zeros(shape))
        assert values.shape == (shape[0], shape[1] // 2) and meta.shape == (shape[0], -(-shape[1] // 32))
        assert ops.decompress_24(values, meta).shape == shape


# -- errors and the op layer -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_not_24_names_row_and_columns(backend, request):
    if backend == "interpret":
        request.getfixturevalue("interpret")
    weight = torch.zeros(3, 12)
    weight[2, 4:7] = 1.0  # three nonzeros in row 2, group 1
    with pytest.raises(ValueError, match=r"not 2:4: row 2, columns 4\.\.7") as info:
        ops.compress_24(weight)
    assert "row" in str(info.value) and "columns" in str(info.value) and "not 2:4" in str(info.value)


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_k_not_multiple_of_4_refused(backend, request):
    if backend == "interpret":
        request.getfixturevalue("interpret")
    with pytest.raises(ValueError, match="multiple of 4"):
        ops.compress_24(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="multiple of 4"):
        ops.decompress_24(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_opcheck(backend, request):
    if backend == "interpret":
        request.getfixturevalue("interpret")
    weight = random_24((5, 40), torch.float16, seed=8)
    torch.library.opcheck(ops.compress_24, (weight,))
    torch.library.opcheck(ops.decompress_24, reference.compress_24(weight))


# -- the reference alone ------------------------------------------------------------------------------------


def test_reference_packs_by_hand():
    # Groups:  [0 5 0 7] [3 0 0 0] [0 0 0 0] [0 0 0 2] [0 0 9 0] [1 2 0 0] [0 1 0 0] [0 0 4 4]
    # kept:     1,3       0,1       0,1       0,3       0,2       0,1       0,1       2,3
    # nibble:   0xD       0x4       0x4       0xC       0x8       0x4       0x4       0xE    (idx0 | idx1 << 2)
    row = [0, 5, 0, 7, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 9, 0, 1, 2, 0, 0, 0, 1, 0, 0, 0, 0, 4, 4]
    weight = torch.tensor([row + [0, 0, 6, 0]], dtype=torch.float32)  # a 9th group [0 0 6 0]: kept 0,2
    values, meta = reference.compress_24(weight)
    assert values.tolist() == [[5, 7, 3, 0, 0, 0, 0, 2, 0, 9, 1, 2, 0, 1, 4, 4, 0, 6]]
    assert meta.dtype == torch.int32 and meta.tolist() == [[0xE448C44D - 2**32, 0x8]]
    assert torch.equal(reference.decompress_24(values, meta), weight)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_round_trip(shape, dtype):
    weight = random_24(shape, dtype, seed=shape[0])
    values, meta = reference.compress_24(weight)
    assert values.shape == (shape[0], shape[1] // 2) and values.dtype == dtype
    assert meta.shape == (shape[0], -(-shape[1] // 32)) and meta.dtype == torch.int32
    assert torch.equal(reference.decompress_24(values, meta), weight)
    positions = reference.sparse24.unpack_positions(meta, shape[1] // 4)
    assert (positions[..., 0] < positions[..., 1]).all()


def test_reference_check_names_the_first_bad_group():
    weight = torch.zeros(4, 16)
    weight[1, 8:12] = torch.tensor([1.0, 2.0, 0.0, 3.0])
    weight[3, 0:4] = 1.0
    with pytest.raises(ValueError, match=r"row 1, columns 8\.\.11 hold 3 nonzeros \(2 such groups\)"):
        reference.sparse24.check_24(weight)
