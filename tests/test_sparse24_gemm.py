"""The 2:4 sparse linear kernel (interpreter) through the public op, against the masked-dense product in fp32 from
the same rounded inputs: both paths (decode M <= 16, prefill M > 16), split-K, ragged M/N/K (K not a multiple of
32), batch dims, strided inputs, NaN-poisoned outputs, channel-permuted weights (x gathered through perm in the
kernel), and the op's registration (opcheck)."""

import pytest
import torch
from checks import assert_close

from sparsekern import ops, reference
from sparsekern.reference.masks import nm_mask
from sparsekern.reference.sparse24 import compress_24
from sparsekern.triton_kernels import sparse24_gemm

# Outputs are rounded to x's dtype once (fp32 accumulation): errors are a rounding of |y| plus fp32 order.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def weight_24(n, k, dtype, seed=0):
    """A random 2:4 weight [n, k] in ``dtype``, with some groups holding fewer than 2 nonzeros."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    w = w.masked_fill(nm_mask(w.abs(), 2, 4), 0)
    w = w.masked_fill(torch.rand(n, k, generator=gen) < 0.15, 0)  # groups with 1 or 0 kept values
    return w.to(dtype)


def inputs(shape, n, dtype, bias=True, seed=1):
    gen = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(*shape, generator=gen).to(dtype)
    w = weight_24(n, k, dtype, seed)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return x, w, b


def expected(x, w, b):
    """Masked-dense x @ W^T + b in fp32 from the same rounded inputs."""
    y = x.float() @ w.float().T
    return y if b is None else y + b.float()


def check(x, w, b, what):
    values, meta = compress_24(w)
    y = ops.sparse24_linear(x, values, meta, b)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    atol, rtol = TOLERANCES[x.dtype]
    assert_close(y, expected(x, w, b), what, atol=atol, rtol=rtol)
    return y


def test_op_reaches_the_kernel(interpret):
    x = torch.randn(3, 8, dtype=torch.float16)
    assert ops._implementation("sparse24_linear", x) is sparse24_gemm.sparse24_linear


SHAPES = [  # M, N, K, bias: decode (M <= 16) then prefill; K never a multiple of 32 except where noted
    (1, 5, 36, True),
    (3, 37, 68, False),
    (16, 130, 260, True),
    (5, 70, 256, False),  # K a multiple of the tiles' BLOCK_K: no K masks
    (17, 37, 260, False),
    (40, 130, 68, True),
    (200, 37, 36, True),  # prefill with two M tiles of 128
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k, bias", SHAPES)
def test_matches_masked_dense(interpret, poisoned_outputs, dtype, m, n, k, bias):
    x, w, b = inputs((m, k), n, dtype, bias)
    check(x, w, b, f"y {m}x{n}x{k} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [3, 40])
def test_batch_dims_and_strided_x(interpret, poisoned_outputs, dtype, m):
    k, n = 68, 37
    x, w, b = inputs((2, 3, k), n, dtype)
    check(x, w, b, "y [2, 3, K]")
    # Non-contiguous x: every other column of a wider tensor (a strided view), and a transposed batch.
    wide = torch.randn(m, 2 * k).to(dtype)
    check(wide[:, ::2], w, b, "y from x[:, ::2]")
    check(torch.randn(k, m).to(dtype).T, w, None, "y from x.T")
    check(torch.randn(3, m, k).to(dtype).transpose(0, 1), w, b, "y from a transposed batch")


SPLITS = [  # M, K, dtype: decode then prefill; ragged K, K a multiple of the splits' span (no K masks), and a
    # last split with iterations past K
    (2, 1028, torch.float16),
    (2, 1024, torch.bfloat16),
    (3, 868, torch.float32),
    (3, 868, torch.float16),
    (40, 516, torch.bfloat16),
    (40, 640, torch.float16),
    (40, 516, torch.float32),
]


@pytest.mark.parametrize("m, k, dtype", SPLITS)
def test_split_k(interpret, poisoned_outputs, monkeypatch, m, k, dtype):
    """More SMs than programs: K is split and the partials are reduced in order (with the bias)."""
    monkeypatch.setattr(sparse24_gemm, "INTERPRETER_SMS", 64)
    splits = sparse24_gemm._config(m, 37, k, dtype, 64)[-1]
    assert splits > 1, "this shape should split K"
    x, w, b = inputs((m, k), 37, dtype)
    check(x, w, b, f"y split-K {splits}")
    check(x, w, None, f"y split-K {splits}, no bias")


def test_large_prefill_tiles(interpret, poisoned_outputs):
    """256-row tiles: taken once they still fill every SM (here the interpreter's 4)."""
    m, n, k = 300, 260, 64
    assert sparse24_gemm._config(m, n, k, torch.float16, sparse24_gemm.INTERPRETER_SMS)[0] == 256
    x, w, b = inputs((m, k), n, torch.float16)
    check(x, w, b, "y 256-row tiles")


def test_values_in_another_dtype_and_strided_operands(interpret, poisoned_outputs):
    x, w, b = inputs((5, 68), 37, torch.float16)
    values, meta = compress_24(w.float())  # fp32 values, fp16 activations: rounded to fp16 (exact here)
    y = ops.sparse24_linear(x, values, meta, b.float())
    assert_close(y, expected(x, w, b), "y, fp32 values", atol=1e-2, rtol=1e-2)
    values, meta = compress_24(w)
    strided = torch.zeros(values.shape[0], values.shape[1] + 1, dtype=values.dtype)[:, 1:]  # odd offset: no int32 view
    strided.copy_(values)
    strided_bias = torch.zeros(2 * b.shape[0], dtype=b.dtype)[::2]
    strided_bias.copy_(b)
    y = ops.sparse24_linear(x, strided, meta, strided_bias)
    assert_close(y, expected(x, w, b), "y, strided values and bias", atol=1e-2, rtol=1e-2)


def test_empty_shapes(interpret, poisoned_outputs):
    w = weight_24(6, 8, torch.float16)
    values, meta = compress_24(w)
    assert ops.sparse24_linear(torch.randn(0, 8).half(), values, meta, None).shape == (0, 6)
    assert ops.sparse24_linear(torch.randn(2, 0, 8).half(), values, meta, None).shape == (2, 0, 6)
    empty_values, empty_meta = torch.zeros(6, 0).half(), torch.zeros(6, 0, dtype=torch.int32)
    bias = torch.randn(6).half()
    y = ops.sparse24_linear(torch.randn(3, 0).half(), empty_values, empty_meta, bias)
    assert torch.equal(y, bias.expand(3, 6))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(interpret, bias):
    x, w, b = inputs((2, 3, 36), 5, torch.float16, bias)
    values, meta = compress_24(w)
    torch.library.opcheck(ops.sparse24_linear, (x, values, meta, b))


# -- channel permutation: W stored in permuted input order, y = x[..., perm] @ W^T, gathered in the kernel ------

PERM_SHAPES = [  # M, N, K, bias: decode and prefill, ragged K and K a multiple of BLOCK_K (no K masks)
    (1, 5, 36, True),
    (5, 70, 256, False),
    (17, 37, 260, True),
    (33, 130, 68, False),
]


@pytest.mark.parametrize("perm_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k, bias", PERM_SHAPES)
def test_perm_matches_reference(interpret, poisoned_outputs, dtype, perm_dtype, m, n, k, bias):
    x, w, b = inputs((m, k), n, dtype, bias)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k)).to(perm_dtype)
    values, meta = compress_24(w)
    y = ops.sparse24_linear(x, values, meta, b, perm)
    what = f"y {m}x{n}x{k} {dtype} perm {perm_dtype}"
    atol, rtol = TOLERANCES[dtype]
    assert_close(y, expected(x[:, perm.long()], w, b), what, atol=atol, rtol=rtol)
    assert_close(y, reference.sparse24_linear(x, values, meta, b, perm).float(), f"{what} vs reference",
                 atol=atol, rtol=rtol)


@pytest.mark.parametrize("m, k, dtype", [(2, 1028, torch.float16), (40, 516, torch.bfloat16)])
def test_perm_split_k_batch_dims_and_strided_x(interpret, poisoned_outputs, monkeypatch, m, k, dtype):
    monkeypatch.setattr(sparse24_gemm, "INTERPRETER_SMS", 64)
    assert sparse24_gemm._config(m, 37, k, dtype, 64)[-1] > 1, "this shape should split K"
    _, w, b = inputs((m, k), 37, dtype)
    values, meta = compress_24(w)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, m, 2 * k).to(dtype)[..., ::2]  # batch dims and a column stride of 2
    y = ops.sparse24_linear(x, values, meta, b, perm.int())
    atol, rtol = TOLERANCES[dtype]
    assert_close(y, expected(x[..., perm], w, b), "y split-K, strided x, perm", atol=atol, rtol=rtol)


def test_perm_is_checked():
    x, w, _ = inputs((3, 36), 5, torch.float16)
    values, meta = compress_24(w)
    with pytest.raises(ValueError, match=r"perm must be int32 or int64 \[36\]"):
        ops.sparse24_linear(x, values, meta, None, torch.arange(32))
    with pytest.raises(ValueError, match="perm must be int32 or int64"):
        ops.sparse24_linear(x, values, meta, None, torch.arange(36).float())


def test_opcheck_with_perm(interpret):
    x, w, b = inputs((2, 3, 36), 5, torch.float16)
    values, meta = compress_24(w)
    perm = torch.randperm(36, generator=torch.Generator().manual_seed(0)).int()
    torch.library.opcheck(ops.sparse24_linear, (x, values, meta, b, perm))
