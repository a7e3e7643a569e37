"""The bitmap sparse linear kernel (interpreter) through the public op, against the masked-dense product in fp32 from
the same rounded inputs: decode (M <= 16) and prefill, split-K (deterministic), ragged M/N/K (K not a multiple of
32 or 128), sparsity 0/50/90/100% and empty rows, batch dims, strided inputs, NaN-poisoned outputs, values in
another dtype, a damaged padding bit, and the op's registration (opcheck) and argument errors."""

import pytest
import torch
from checks import assert_close

from sparsekern import ops, reference
from sparsekern.reference.bitmap import compress_bitmap
from sparsekern.triton_kernels import bitmap_gemm

# Outputs are rounded to x's dtype once (fp32 accumulation): errors are a rounding of |y| plus fp32 order.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def inputs(shape, n, dtype, sparsity=0.5, bias=True, seed=1):
    k = shape[-1]
    x = torch.randn(*shape, generator=gen(seed)).to(dtype)
    w = torch.randn(n, k, generator=gen(seed + 1)).to(dtype)
    w = w.masked_fill(torch.rand(n, k, generator=gen(seed + 2)) < sparsity, 0)
    if n > 2:
        w[1] = 0  # an empty row
    b = torch.randn(n, generator=gen(seed + 3)).to(dtype) if bias else None
    return x, w, b


def expected(x, w, b):
    """Masked-dense x @ W^T + b in fp32 from the same rounded inputs."""
    y = x.float() @ w.float().T
    return y if b is None else y + b.float()


def check(x, w, b, what):
    values, bitmap, offsets = compress_bitmap(w)
    y = ops.bitmap_linear(x, values, bitmap, offsets, b)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    atol, rtol = TOLERANCES[x.dtype]
    assert_close(y, expected(x, w, b), what, atol=atol, rtol=rtol)
    return y


def test_op_reaches_the_kernel(interpret):
    x = torch.randn(3, 8, dtype=torch.float16)
    assert ops._implementation("bitmap_linear", x) is bitmap_gemm.bitmap_linear


SHAPES = [  # M, N, K, sparsity, bias: decode (M <= 16) then prefill; K never a multiple of 32 except where noted
    (1, 5, 123, 0.5, True),
    (3, 37, 257, 0.9, False),
    (16, 70, 300, 0.0, True),
    (5, 37, 256, 0.5, False),  # K a multiple of BLOCK_K: no K masks
    (17, 37, 130, 1.0, True),  # nothing kept: y = bias
    (33, 130, 100, 0.5, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k, sparsity, bias", SHAPES)
def test_matches_masked_dense(interpret, poisoned_outputs, dtype, m, n, k, sparsity, bias):
    x, w, b = inputs((m, k), n, dtype, sparsity, bias)
    check(x, w, b, f"y {m}x{n}x{k} {dtype} sparsity {sparsity}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [3, 33])
def test_batch_dims_and_strided_x(interpret, poisoned_outputs, dtype, m):
    k, n = 123, 37
    x, w, b = inputs((2, 3, k), n, dtype)
    check(x, w, b, "y [2, 3, K]")
    # Non-contiguous x: every other column of a wider tensor (a strided view), and a transposed batch.
    wide = torch.randn(m, 2 * k).to(dtype)
    check(wide[:, ::2], w, b, "y from x[:, ::2]")
    check(torch.randn(3, m, k).to(dtype).transpose(0, 1), w, None, "y from a transposed batch")


SPLITS = [  # M, K, dtype: decode then prefill; ragged K, K a multiple of the splits' span (no K masks), and a
    # last split with whole steps past K (7 steps in 3 splits of 3)
    (2, 1000, torch.float16),
    (3, 512, torch.bfloat16),
    (3, 866, torch.float16),
    (1, 700, torch.float32),
    (20, 1000, torch.bfloat16),
]


@pytest.mark.parametrize("m, k, dtype", SPLITS)
def test_split_k_deterministic(interpret, poisoned_outputs, monkeypatch, m, k, dtype):
    """More SMs than programs: K is split and the partials are reduced in order (with the bias); the same bits on
    every run."""
    monkeypatch.setattr(bitmap_gemm, "INTERPRETER_SMS", 64)
    splits = bitmap_gemm._config(m, 37, k, dtype, 64)[-1]
    assert splits > 1, "this shape should split K"
    x, w, b = inputs((m, k), 37, dtype, sparsity=0.6)
    y = check(x, w, b, f"y split-K {splits}")
    values, bitmap, offsets = compress_bitmap(w)
    assert torch.equal(ops.bitmap_linear(x, values, bitmap, offsets, b), y), "split-K is not deterministic"
    check(x, w, None, f"y split-K {splits}, no bias")


def test_values_in_another_dtype_and_strided_operands(interpret, poisoned_outputs):
    x, w, b = inputs((5, 140), 37, torch.float16)
    values, bitmap, offsets = compress_bitmap(w.float())  # fp32 values, fp16 x: rounded to fp16 (exact here)
    y = ops.bitmap_linear(x, values, bitmap, offsets, b.float())
    assert_close(y, expected(x, w, b), "y, fp32 values", atol=1e-2, rtol=1e-2)
    values, bitmap, offsets = compress_bitmap(w)
    strided_values = torch.zeros(2 * values.numel(), dtype=values.dtype)[1::2]
    strided_values.copy_(values)
    strided_bias = torch.zeros(2 * b.shape[0], dtype=b.dtype)[::2]
    strided_bias.copy_(b)
    y = ops.bitmap_linear(x, strided_values, bitmap.T.contiguous().T, offsets.T.contiguous().T, strided_bias)
    assert_close(y, expected(x, w, b), "y, strided values, bitmap, offsets and bias", atol=1e-2, rtol=1e-2)


def test_padding_bits_are_ignored(interpret, poisoned_outputs):
    """A damaged bitmap with bits set past K loads nothing for them (no read past the row's values)."""
    x, w, b = inputs((3, 100), 6, torch.float16)
    values, bitmap, offsets = compress_bitmap(w)
    bitmap[:, -1] |= -2**31  # column 127 of every row, past K = 100
    y = ops.bitmap_linear(x, values, bitmap, offsets, b)
    assert_close(y, expected(x, w, b), "y with padding bits set", atol=1e-2, rtol=1e-2)


def test_empty_shapes(interpret, poisoned_outputs):
    _, w, _ = inputs((1, 8), 6, torch.float16)
    values, bitmap, offsets = compress_bitmap(w)
    assert ops.bitmap_linear(torch.randn(0, 8).half(), values, bitmap, offsets, None).shape == (0, 6)
    assert ops.bitmap_linear(torch.randn(2, 0, 8).half(), values, bitmap, offsets, None).shape == (2, 0, 6)
    bias = torch.randn(6).half()
    empty = compress_bitmap(torch.zeros(6, 0).half())
    assert torch.equal(ops.bitmap_linear(torch.randn(3, 0).half(), *empty, bias), bias.expand(3, 6))


def test_reference_matches_masked_dense():
    x, w, b = inputs((2, 3, 123), 37, torch.float32)
    y = reference.bitmap_linear(x, *compress_bitmap(w), b)
    assert_close(y, expected(x, w, b), "reference y", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "interpret"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(backend, bias, request):
    if backend == "interpret":
        request.getfixturevalue("interpret")
    x, w, b = inputs((2, 3, 140), 5, torch.float16, bias=bias)
    torch.library.opcheck(ops.bitmap_linear, (x, *compress_bitmap(w), b))


def test_arguments_checked():
    x, w, b = inputs((3, 100), 5, torch.float16)
    values, bitmap, offsets = compress_bitmap(w)
    with pytest.raises(ValueError, match=r"bitmap has shape \(5, 4\), expected \(5, 5\) for x.shape\[-1\] = 130"):
        ops.bitmap_linear(torch.randn(3, 130).half(), values, bitmap, offsets, b)
    with pytest.raises(ValueError, match=r"offsets must be int32 \(5, 1\)"):
        ops.bitmap_linear(x, values, bitmap, offsets.long(), b)
    with pytest.raises(ValueError, match=r"bias has shape \(4,\), expected \(5,\)"):
        ops.bitmap_linear(x, values, bitmap, offsets, b[:4])
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        ops.bitmap_linear(torch.tensor(1.0), values, bitmap, offsets, b)
    with pytest.raises(ValueError, match=r"values must be a 1-D float tensor"):
        ops.bitmap_linear(x, values.int(), bitmap, offsets, b)
