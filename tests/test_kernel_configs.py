"""Every kernel configuration the launchers can pick, run once against the reference: compiled on a GPU (the GPU
check runs ``pytest -m "gpu or configs"`` with ``TRITON_INTERPRET=0``), interpreted on CPU tensors otherwise.

The launchers pick tiles, warps and compile-time flags from the shapes, dtypes and the GPU's SM count; each case
below is shaped to reach one choice (the SparseGPT sweep's register widths 16..256 with each pattern and
quantization flag, the Hessian's output tiles, Wanda's warps per row length, the 2:4 GEMM's decode / prefill
tiles with and without split-K, ragged K, fp32). Where the choice is a function of the shape (the 2:4 GEMM's
``_config``), the case asserts it reached the one it names, on this device: on the CPU the interpreter's own
choices run, so these cases are a smoke test of the harness there and a check of every compiled configuration on
a GPU. GPU rounding differs from the CPU reference (FMA, reduction order), so masks are compared by agreement
where a near-tie may flip, and values by relative error.
"""

import os

import pytest
import torch
from checks import assert_mask

from sparsekern import reference
from sparsekern.reference.masks import nm_mask

pytestmark = pytest.mark.configs


@pytest.fixture(scope="module")
def device():
    """Where the launchers run (they are called directly, not through the ops' backend choice)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("compiled kernels need a CUDA GPU (or TRITON_INTERPRET=1 for the interpreter)")
    return torch.device("cuda")


def randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def relative_error(got, expected):
    got, expected = got.double(), expected.double()
    assert not torch.isnan(got).any(), "NaN in the output (an element never written?)"
    return ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def hinv_upper(n, device, seed=0):
    x = randn(3 * n, n, seed=seed)
    return reference.hinv_cholesky(2 * x.T @ x / x.shape[0], 0.01, 1)[0].to(device)


# -- SparseGPT: the one-launch sweep (register width = next power of 2 of the block, >= 16) and the lazy update ---

SWEEPS = [  # width (-> BLOCK_B), pattern (sparsity | (n, m)), bits, groupsize, dtype
    (13, 0.5, 0, 0, torch.float16),  # 16
    (32, (2, 4), 0, 0, torch.bfloat16),  # 32
    (64, (4, 8), 4, 0, torch.float32),  # 64, N:M with a per-row grid
    (128, 0.5, 4, 32, torch.float16),  # 128, grouped quantization inside the block
    (128, (2, 4), 0, 0, torch.float32),
    (128, 0.5, 0, 0, torch.bfloat16),
    (200, (2, 4), 3, 40, torch.float16),  # 256, five groups
    (256, 0.5, 0, 0, torch.float32),  # 256
]


@pytest.mark.parametrize("width, pattern, bits, groupsize, dtype", SWEEPS)
def test_sparsegpt_sweep(device, width, pattern, bits, groupsize, dtype):
    from sparsekern.triton_kernels.sparsegpt_sweep import sparsegpt_sweep

    rows = 45  # three 16-row programs on a GPU, the last one ragged
    block = randn(rows, width, seed=1, dtype=dtype, device=device)
    hinv = hinv_upper(width, device)
    n, m = pattern if isinstance(pattern, tuple) else (0, 0)
    prune_mask = None
    if not n:
        prune_mask = reference.tensor_mask(block.float() ** 2, reference.prune_count(block.numel(), pattern))
    if bits and not groupsize:
        scale, zero = (t.unsqueeze(1) for t in reference.minmax_params(block.float(), bits))
    else:
        groups = -(-width // groupsize) if groupsize else 1
        scale, zero = (torch.full((rows, groups), float("nan"), device=device) for _ in range(2))
    ref_scale, ref_zero = scale.clone(), zero.clone()
    q, err, loss, mask = sparsegpt_sweep(block, hinv, prune_mask, n, m, bits, scale, zero, groupsize)
    q_ref, err_ref, loss_ref, mask_ref = reference.sparsegpt_sweep(
        block.float(), hinv, None if prune_mask is None else prune_mask.clone(), n, m, bits, ref_scale, ref_zero,
        groupsize)
    assert_mask(mask, "mask")
    agree = (mask == mask_ref).float().mean().item()
    assert agree >= (1.0 if device.type == "cpu" else 0.99), f"masks agree on {agree:.4f}"
    assert (q[mask] == 0).all(), "pruned weights must be exactly 0"
    assert loss.sum().item() == pytest.approx(loss_ref.sum().item(), rel=1e-2 if device.type == "cuda" else 1e-4)
    if agree == 1.0:
        assert relative_error(q, q_ref) < 1e-4 and relative_error(err, err_ref) < 1e-3


@pytest.mark.parametrize("precision, tolerance", [("ieee", 1e-5), ("tf32", 3e-3)])
def test_lazy_update(device, precision, tolerance):
    from sparsekern.triton_kernels.sparsegpt_sweep import lazy_update

    w, err, u = randn(130, 200, seed=2, device=device), randn(130, 70, seed=3, device=device), randn(
        70, 200, seed=4, device=device)
    expected = w.double() - err.double() @ u.double()
    lazy_update(w, err, u, precision)
    assert relative_error(w, expected) < tolerance


def test_sparsegpt_prune_blocks_and_segments(device):
    """The whole-layer op: radix-selected block masks, sweeps in segments, lazy updates between blocks."""
    from sparsekern.prune.sparsegpt_loop import sparsegpt_prune

    weight = randn(70, 300, seed=5, dtype=torch.float16, device=device)
    upper = hinv_upper(300, device)
    got, loss, _, _ = sparsegpt_prune(weight, upper, 0.5, 0, 0, 128, 0, 0)
    expected, loss_ref, _, _ = reference.sparsegpt_prune(weight, upper, 0.5, 0, 0, 128, 0, 0)
    agree = ((got == 0) == (expected == 0)).float().mean().item()
    assert agree >= (1.0 if device.type == "cpu" else 0.99), f"masks agree on {agree:.4f}"
    assert loss.sum().item() == pytest.approx(loss_ref.sum().item(), rel=1e-2)


@pytest.mark.parametrize("numel, k", [(3 * 5000, 1), (3 * 5000, 7500), (3 * 5000, 14999)])
def test_lowest_k_mask(device, numel, k):
    from sparsekern.triton_kernels.select import lowest_k_mask

    values = randn(numel, seed=6, device=device).square().reshape(3, -1)
    assert torch.equal(lowest_k_mask(values, k).cpu(), reference.tensor_mask(values.cpu(), k))


# -- calibration statistics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k, dtype", [(13, torch.float32), (64, torch.bfloat16), (200, torch.float32),
                                      (200, torch.bfloat16), (200, torch.float16)])
def test_hessian_update(device, k, dtype):  # output tiles 16, 64 and 128 (8 warps)
    from sparsekern.triton_kernels.stats import hessian_update

    x = randn(3000, k, seed=7, dtype=dtype, device=device)
    h, h_ref = torch.zeros(k, k, device=device), torch.zeros(k, k, device=device)
    assert hessian_update(h, x, 5) == reference.hessian_update(h_ref, x, 5) == 3005
    assert torch.equal(h, h.T)
    assert relative_error(h, h_ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sumsq_update(device, dtype):
    from sparsekern.triton_kernels.stats import sumsq_update

    x = randn(3000, 77, seed=8, dtype=dtype, device=device)
    s, s_ref = torch.zeros(77, device=device), torch.zeros(77, device=device)
    sumsq_update(s, x, 0)
    reference.sumsq_update(s_ref, x, 0)
    assert relative_error(s, s_ref) < 1e-5


# -- Wanda: one program per row, warps by row length; N:M groups ------------------------------------------------


@pytest.mark.parametrize("cols", [100, 5000, 20000, 40000])  # 4, 8 and 32 warps; 64 elements per thread
def test_wanda_unstructured(device, cols):
    from sparsekern.triton_kernels.wanda import wanda_prune

    weight = randn(3, cols, seed=9, dtype=torch.float16, device=device)
    norm = randn(cols, seed=10, device=device).abs() + 0.1
    expected_weight = weight.clone()
    expected = reference.wanda_prune(expected_weight, norm, 0.5, 0, 0)
    got = wanda_prune(weight, norm, 0.5, 0, 0)
    assert_mask(got, "mask")
    assert torch.equal(got, expected) and torch.equal(weight, expected_weight)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_wanda_nm(device, n, m):
    from sparsekern.triton_kernels.wanda import wanda_prune

    weight = randn(37, 8 * 33, seed=11, dtype=torch.bfloat16, device=device)
    norm = randn(8 * 33, seed=12, device=device).abs() + 0.1
    expected = reference.wanda_prune(weight.clone(), norm, 0.0, n, m)
    got = wanda_prune(weight, norm, 0.0, n, m)
    assert_mask(got, "mask")
    assert (got != expected).float().mean().item() < 1e-3


# -- 2:4 compressed weights and the 2:4 GEMM ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compress_decompress_24(device, dtype):
    from sparsekern.triton_kernels.sparse24 import compress_24, decompress_24

    weight = randn(37, 260, seed=13, dtype=dtype, device=device)
    weight = weight.masked_fill(nm_mask(weight.abs().float(), 2, 4), 0)
    values, meta = compress_24(weight)
    expected_values, expected_meta = reference.compress_24(weight)
    assert torch.equal(values, expected_values) and torch.equal(meta, expected_meta)
    assert torch.equal(decompress_24(values, meta), weight)


def _gemm_cases():
    """(label, dtype, tiles the launcher must pick, shape(sms) -> (m, n, k), bias)."""
    from sparsekern.triton_kernels import sparse24_gemm as g

    def cdiv(a, b):
        return -(-a // b)

    half = [
        ("decode, split-K", g.DECODE_TILES, lambda sms: (1, 64, 4096), True),
        ("decode, a program per SM", g.DECODE_TILES, lambda sms: (16, 64 * sms, 256), False),
        ("prefill M <= 64", g.PREFILL_TILES_64, lambda sms: (40, 128, 256), True),
        ("prefill 128-row tiles", g.PREFILL_TILES_128, lambda sms: (200, 256, 256), False),
        ("prefill 128-row tiles, K % 16 != 0", g.PREFILL_TILES_128, lambda sms: (200, 256, 1004), True),
        ("prefill 256-row tiles", g.PREFILL_TILES_256, lambda sms: (512, 128 * cdiv(sms, 2), 128), True),
    ]
    cases = [(label, dtype, tiles, shape, bias) for dtype in (torch.float16, torch.bfloat16)
             for label, tiles, shape, bias in half]
    cases += [("fp32 decode", torch.float32, g.FP32_DECODE_TILES, lambda sms: (3, 100, 260), True),
              ("fp32 prefill", torch.float32, g.FP32_PREFILL_TILES, lambda sms: (70, 100, 260), False)]
    return cases


@pytest.mark.parametrize("label, dtype, tiles, shape, bias", _gemm_cases(),
                         ids=[f"{case[0]}-{str(case[1]).removeprefix('torch.')}" for case in _gemm_cases()])
def test_sparse24_linear(device, label, dtype, tiles, shape, bias):
    from sparsekern.triton_kernels import sparse24_gemm

    m, n, k = shape(sparse24_gemm._num_sms(device))
    config = sparse24_gemm._config(m, n, k, dtype, sparse24_gemm._num_sms(device))
    assert config[:5] == tiles, f"{label}: M={m} N={n} K={k} picked {config}, not {tiles}"
    weight = randn(n, k, seed=14, dtype=dtype, device=device)
    weight = weight.masked_fill(nm_mask(weight.abs().float(), 2, 4), 0)
    values, meta = reference.compress_24(weight)
    x = randn(m, k, seed=15, dtype=dtype, device=device)
    b = randn(n, seed=16, dtype=dtype, device=device) if bias else None
    expected = x.float() @ weight.float().T + (0 if b is None else b.float())
    got = sparse24_gemm.sparse24_linear(x, values, meta, b)
    assert got.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    assert relative_error(got, expected) < tolerance, f"{label} (splits {config[5]})"


@pytest.mark.parametrize("label, m, n, k", [("decode, split-K, perm", 1, 64, 4096), ("prefill, perm", 200, 256, 1004)])
def test_sparse24_linear_permuted(device, label, m, n, k):
    """The kernel's gathered loads of x (channel permutation): y = x[:, perm] @ W^T."""
    from sparsekern.triton_kernels import sparse24_gemm

    dtype = torch.float16
    weight = randn(n, k, seed=17, dtype=dtype, device=device)
    weight = weight.masked_fill(nm_mask(weight.abs().float(), 2, 4), 0)
    values, meta = reference.compress_24(weight)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(18)).to(device=device, dtype=torch.int32)
    x = randn(m, k, seed=19, dtype=dtype, device=device)
    expected = x.float()[:, perm.long()] @ weight.float().T
    got = sparse24_gemm.sparse24_linear(x, values, meta, None, perm)
    assert relative_error(got, expected) < 5e-3, label


# -- the bitmap format and its GEMM ---------------------------------------------------------------------------


def _unstructured(n, k, sparsity, seed, dtype, device):
    weight = randn(n, k, seed=seed, dtype=dtype, device=device)
    return weight.masked_fill(torch.rand(n, k, generator=torch.Generator().manual_seed(seed + 1)).to(device)
                              < sparsity, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compress_decompress_bitmap(device, dtype):
    from sparsekern.triton_kernels.bitmap import compress_bitmap, decompress_bitmap

    weight = _unstructured(37, 300, 0.6, 20, dtype, device)
    got = compress_bitmap(weight)
    expected = reference.compress_bitmap(weight.cpu())
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, expected))
    assert torch.equal(decompress_bitmap(*got, 300), weight)


def _bitmap_gemm_cases():
    """(label, dtype, tiles the launcher must pick, shape(sms) -> (m, n, k), bias)."""
    from sparsekern.triton_kernels import bitmap_gemm as g

    half = [
        ("decode, split-K", g.DECODE_TILES, lambda sms: (1, 64, 4096), True),
        ("decode, a program per SM, ragged K", g.DECODE_TILES, lambda sms: (16, 64 * sms, 300), False),
        ("prefill M <= 64", g.PREFILL_TILES_64, lambda sms: (40, 128, 256), True),
        ("prefill 128-row tiles, ragged K", g.PREFILL_TILES_128, lambda sms: (200, 128, 1004), True),
    ]
    cases = [(label, dtype, tiles, shape, bias) for dtype in (torch.float16, torch.bfloat16)
             for label, tiles, shape, bias in half]
    cases += [("fp32 decode", torch.float32, g.FP32_DECODE_TILES, lambda sms: (3, 100, 260), True),
              ("fp32 prefill", torch.float32, g.FP32_PREFILL_TILES, lambda sms: (70, 100, 260), False)]
    return cases


@pytest.mark.parametrize("label, dtype, tiles, shape, bias", _bitmap_gemm_cases(),
                         ids=[f"{case[0]}-{str(case[1]).removeprefix('torch.')}" for case in _bitmap_gemm_cases()])
def test_bitmap_linear(device, label, dtype, tiles, shape, bias):
    from sparsekern.triton_kernels import bitmap_gemm

    sms = bitmap_gemm._num_sms(device)
    m, n, k = shape(sms)
    config = bitmap_gemm._config(m, n, k, dtype, sms)
    assert config[:5] == tiles, f"{label}: M={m} N={n} K={k} picked {config}, not {tiles}"
    weight = _unstructured(n, k, 0.6, 21, dtype, device)
    values, bitmap, offsets = (t.to(device) for t in reference.compress_bitmap(weight.cpu()))
    x = randn(m, k, seed=22, dtype=dtype, device=device)
    b = randn(n, seed=23, dtype=dtype, device=device) if bias else None
    expected = x.float() @ weight.float().T + (0 if b is None else b.float())
    got = bitmap_gemm.bitmap_linear(x, values, bitmap, offsets, b)
    assert got.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    assert relative_error(got, expected) < tolerance, f"{label} (splits {config[5]})"
