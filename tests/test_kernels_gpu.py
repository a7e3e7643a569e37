"""The compiled kernels on a GPU against the PyTorch reference on the same GPU tensors.

Triton picks interpreter or compiler when a kernel is decorated, so these run in their own process:

    TRITON_INTERPRET=0 SPARSEKERN_BACKEND=cuda python -m pytest -m gpu tests
"""

import os

import pytest
import torch
from checks import assert_close

from sparsekern import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs compiled kernels: run with TRITON_INTERPRET=0 (see module docstring)"),
]


def cuda_randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).cuda()


def hinv_upper(cols, tokens=4096):
    mix = cuda_randn(cols // 4, cols, seed=1) / (cols // 4) ** 0.5
    x = cuda_randn(tokens, cols // 4, seed=2) @ mix + 0.3 * cuda_randn(tokens, cols, seed=3)
    hessian = 2 * x.T @ x / tokens
    return reference.hinv_cholesky(hessian, 0.01, 4)[0], hessian


@pytest.mark.parametrize("rows, cols", [(777, 512), (1024, 1536)])
@pytest.mark.parametrize("pattern, wbits, groupsize", [(0.5, 0, 0), ((2, 4), 0, 0), ((2, 4), 4, 0), (0.5, 3, 128)])
def test_sparsegpt_prune(rows, cols, pattern, wbits, groupsize):
    from sparsekern.prune.sparsegpt_loop import sparsegpt_prune

    upper, _ = hinv_upper(cols)
    weight = cuda_randn(rows, cols, seed=4, dtype=torch.float16)
    n, m = pattern if isinstance(pattern, tuple) else (0, 0)
    sparsity = 0.0 if n else pattern
    got, loss, _, _ = sparsegpt_prune(weight, upper, sparsity, n, m, 128, wbits, groupsize)
    expected, loss_ref, _, _ = reference.sparsegpt_prune(weight, upper, sparsity, n, m, 128, wbits, groupsize)
    torch.cuda.synchronize()
    # GPU sums round differently (FMA, reduction order), so near-tied mask choices may flip, and a flip changes
    # the rest of its row: compare the masks' agreement and the total OBS loss, not every weight.
    agree = ((got == 0) == (expected == 0)).float().mean().item()
    assert agree > 0.99, f"masks agree on {agree:.4f}"
    assert loss.sum().item() == pytest.approx(loss_ref.sum().item(), rel=0.01)
    if n:
        assert ((got == 0).reshape(rows, -1, m).sum(-1) >= n).all()


def test_lazy_update_tf32_close_to_ieee():
    from sparsekern.triton_kernels.sparsegpt_sweep import lazy_update

    w, err, u = cuda_randn(1000, 900, seed=5), cuda_randn(1000, 128, seed=6), cuda_randn(128, 900, seed=7)
    expected = w.double() - err.double() @ u.double()
    for precision, tolerance in [("ieee", 1e-5), ("tf32", 3e-3)]:
        got = w.clone()
        lazy_update(got, err, u, precision)
        relative = ((got.double() - expected).norm() / expected.norm()).item()
        assert relative < tolerance, f"{precision}: relative error {relative:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", [0.5, (2, 4)])
def test_wanda_prune_identical_masks(dtype, pattern):
    from sparsekern.triton_kernels.wanda import wanda_prune

    n, m = pattern if isinstance(pattern, tuple) else (0, 0)
    weight = cuda_randn(1000, 11008 if n == 0 else 4096, seed=8, dtype=dtype)
    norm = torch.rand(weight.shape[1], device="cuda") + 0.1
    expected_weight = weight.clone()
    expected = reference.wanda_prune(expected_weight, norm, 0.5, n, m)
    got = wanda_prune(weight, norm, 0.5, n, m)
    if n:  # topk orders exact ties freely
        assert ((got != expected).float().mean().item()) < 1e-3
    else:
        assert torch.equal(got, expected)
        assert torch.equal(weight, expected_weight)


def test_lowest_k_mask_identical():
    from sparsekern.triton_kernels.select import lowest_k_mask

    values = cuda_randn(4096, 128, seed=9).square()
    for k in [1, 262144, 524287]:
        assert torch.equal(lowest_k_mask(values, k), reference.tensor_mask(values, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_statistics(dtype):
    from sparsekern.triton_kernels.stats import hessian_update, sumsq_update

    x = cuda_randn(8192, 1000, seed=10, dtype=dtype)
    h, h_ref = torch.zeros(1000, 1000, device="cuda"), torch.zeros(1000, 1000, device="cuda")
    s, s_ref = torch.zeros(1000, device="cuda"), torch.zeros(1000, device="cuda")
    assert hessian_update(h, x, 0) == reference.hessian_update(h_ref, x, 0) == 8192
    sumsq_update(s, x, 0)
    reference.sumsq_update(s_ref, x, 0)
    assert_close(h, h_ref, "hessian", atol=1e-5 * h_ref.abs().max().item(), rtol=1e-4)
    assert torch.equal(h, h.T)
    assert_close(s, s_ref, "sumsq", atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compress_decompress_24_bit_exact(dtype):
    from sparsekern.reference.masks import nm_mask
    from sparsekern.triton_kernels.sparse24 import compress_24, decompress_24

    weight = cuda_randn(4096, 11008, seed=11, dtype=dtype)
    weight = weight.masked_fill(nm_mask(weight.abs().float(), 2, 4), 0)
    values, meta = compress_24(weight)
    expected_values, expected_meta = reference.compress_24(weight)
    assert torch.equal(values.view(torch.int16), expected_values.view(torch.int16))
    assert torch.equal(meta, expected_meta)
    assert torch.equal(decompress_24(values, meta).view(torch.int16), weight.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 16, 17, 128, 2048])
def test_sparse24_linear_matches_dense(dtype, m):
    from sparsekern.reference.masks import nm_mask
    from sparsekern.triton_kernels.sparse24_gemm import sparse24_linear

    weight = cuda_randn(4096, 4096, seed=12, dtype=dtype)
    weight = weight.masked_fill(nm_mask(weight.abs().float(), 2, 4), 0)
    values, meta = reference.compress_24(weight)
    x, bias = cuda_randn(m, 4096, seed=13, dtype=dtype), cuda_randn(4096, seed=14, dtype=dtype)
    expected = (x.float() @ weight.float().T + bias.float())
    got = sparse24_linear(x, values, meta, bias)
    relative = ((got.float() - expected).norm() / expected.norm()).item()
    assert got.dtype == dtype and relative < (5e-3 if dtype == torch.float16 else 2e-2), relative


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 16, 17, 128, 2048])
def test_bitmap_linear_matches_dense(dtype, m):
    from sparsekern.triton_kernels.bitmap import compress_bitmap, decompress_bitmap
    from sparsekern.triton_kernels.bitmap_gemm import bitmap_linear

    weight = cuda_randn(4096, 4000, seed=15, dtype=dtype)  # K = 4000: a ragged last 128-column tile
    weight = weight.masked_fill(torch.rand(weight.shape, device="cuda", generator=torch.Generator(
        "cuda").manual_seed(16)) < 0.6, 0)
    values, bitmap, offsets = compress_bitmap(weight)
    expected_values, expected_bitmap, expected_offsets = reference.compress_bitmap(weight)
    assert torch.equal(values.view(torch.int16), expected_values.view(torch.int16))
    assert torch.equal(bitmap, expected_bitmap) and torch.equal(offsets, expected_offsets)
    assert torch.equal(decompress_bitmap(values, bitmap, offsets, 4000).view(torch.int16), weight.view(torch.int16))
    x, bias = cuda_randn(m, 4000, seed=17, dtype=dtype), cuda_randn(4096, seed=18, dtype=dtype)
    expected = (x.float() @ weight.float().T + bias.float())
    got = bitmap_linear(x, values, bitmap, offsets, bias)
    relative = ((got.float() - expected).norm() / expected.norm()).item()
    assert got.dtype == dtype and relative < (5e-3 if dtype == torch.float16 else 2e-2), relative


@pytest.mark.parametrize("method, update, pattern", [("admm", "none", "0.7"), ("admm", "none", "2:4"),
                                                     ("sparsegpt", "lsq", "0.5")])
def test_admm_and_lsq_refit_on_the_gpu_match_the_cpu(method, update, pattern):
    """ADMM (eigendecomposition, GEMMs, the radix-select kernel per iteration) and the CG refit on CUDA."""
    from sparsekern.patterns import SparsityPattern
    from sparsekern.prune import make_method

    rows, cols = 1024, 1536
    mix = cuda_randn(cols // 4, cols, seed=8) / (cols // 4) ** 0.5
    x = cuda_randn(4096, cols // 4, seed=9) @ mix + 0.3 * cuda_randn(4096, cols, seed=10)
    weight = cuda_randn(rows, cols, seed=11)
    results = {}
    for device in ("cuda", "cpu"):
        recipe = make_method(method, update=update)
        stats = recipe.new_stats(cols, torch.device(device), "layer")
        stats.add(x.to(device))
        result = recipe.prune_linear(weight.to(device).clone(), recipe.prepare(stats, "layer"),
                                     SparsityPattern.parse(pattern), "layer")
        error = ((weight.to(device) - result.weight) @ x.to(device).T).square().sum().item()
        results[device] = (result.weight.cpu() == 0, error)
    agree = (results["cuda"][0] == results["cpu"][0]).float().mean().item()
    assert agree > 0.98, f"masks agree on {agree:.4f}"
    assert results["cuda"][1] == pytest.approx(results["cpu"][1], rel=0.02)
