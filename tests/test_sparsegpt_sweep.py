"""The fused SparseGPT kernels (interpreter) against the reference: the one-block sweep, the whole-layer op with
its adaptive per-block selection and lazy updates, the radix select, and magnitude pruning built on it."""

import pytest
import torch
from checks import assert_close, assert_mask, check_nm_selection, group_has_ties

from sparsekern import ops, reference
from sparsekern.prune import sparsegpt_loop
from sparsekern.triton_kernels import select, sparsegpt_sweep

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles small enough that these small layers span several programs (ragged last tiles included)."""
    monkeypatch.setattr(sparsegpt_sweep, "INTERPRETER_SWEEP_ROWS", 16)
    monkeypatch.setattr(sparsegpt_sweep, "INTERPRETER_LAZY_TILES", (16, 32, 16))


def hinv_upper(n, seed=0):
    x = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(seed))
    upper, _ = reference.hinv_cholesky(2 * x.T @ x / x.shape[0], 0.01, 1)
    return upper


def weights(rows, cols, dtype, seed=1):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_ops_reach_the_kernels(interpret):
    w = torch.randn(4, 16)
    assert ops._implementation("sparsegpt_sweep", w) is sparsegpt_sweep.sparsegpt_sweep
    assert ops._implementation("sparsegpt_prune", w) is sparsegpt_loop.sparsegpt_prune
    assert ops._implementation("magnitude_prune", w) is select.magnitude_prune


# -- one block ----------------------------------------------------------------------------------------------

SWEEPS = [  # rows, width, pattern (sparsity | (n, m)), bits, groupsize
    (5, 123, 0.5, 0, 0),
    (37, 96, 0.3, 4, 0),
    (37, 100, (2, 4), 0, 0),
    (6, 64, (4, 8), 0, 0),
    (19, 64, (1, 4), 4, 16),
    (37, 120, (2, 4), 3, 40),
    (5, 80, 0.0, 3, 0),
    (33, 256, 0.5, 0, 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width, pattern, bits, groupsize", SWEEPS)
def test_sweep_matches_reference(interpret, poisoned_outputs, dtype, rows, width, pattern, bits, groupsize):
    block = weights(rows, width, dtype)
    hinv = hinv_upper(width)
    n, m = pattern if isinstance(pattern, tuple) else (0, 0)
    prune_mask = None
    if not n:
        prune_mask = reference.tensor_mask(block.float() ** 2, reference.prune_count(block.numel(), pattern))
    groups = 0 if not bits else (1 if not groupsize else -(-width // groupsize))
    if bits and not groupsize:
        scale, zero = (t.unsqueeze(1) for t in reference.minmax_params(block.float(), bits))
    else:
        scale, zero = torch.full((rows, groups), float("nan")), torch.full((rows, groups), float("nan"))
    ref_scale, ref_zero = scale.clone(), zero.clone()

    q, err, loss, mask = ops.sparsegpt_sweep(block, hinv, prune_mask, n, m, bits, scale, zero, groupsize)
    q_ref, err_ref, loss_ref, mask_ref = reference.sparsegpt_sweep(
        block.float(), hinv, None if prune_mask is None else prune_mask.clone(), n, m, bits, ref_scale, ref_zero,
        groupsize)

    assert_mask(mask, "mask")
    assert torch.equal(mask, mask_ref), f"{int((mask != mask_ref).sum())} mask entries differ"
    assert_close(q, q_ref, "q")
    assert_close(err, err_ref, "err", atol=1e-4)
    assert_close(loss, loss_ref, "loss", atol=1e-4)
    assert (q[mask] == 0).all(), "pruned weights must be exactly 0"
    if bits:
        assert_close(scale, ref_scale, "scale")
        assert torch.equal(zero, ref_zero), "zero points differ"
    if n:
        assert (mask.reshape(rows, -1, m).sum(-1) == n).all()


def test_sweep_rejects_blocks_wider_than_a_register_tile(interpret):
    with pytest.raises(ValueError, match="at most 256 columns"):
        ops.sparsegpt_sweep(torch.randn(4, 260), hinv_upper(260), None, 2, 4, 0, None, None, 0)


# -- whole layer --------------------------------------------------------------------------------------------

LAYERS = [  # rows, cols, pattern, blocksize, bits, groupsize
    (5, 123, 0.5, 128, 0, 0),
    (37, 260, 0.5, 128, 0, 0),
    (37, 260, 0.7, 64, 4, 0),
    (37, 260, (2, 4), 128, 0, 0),
    (9, 264, (4, 8), 128, 0, 0),
    (9, 260, (2, 4), 128, 4, 0),
    (9, 256, 0.5, 128, 3, 32),
    (9, 300, 0.5, 100, 4, 20),
    (9, 384, 0.5, 128, 3, 256),
    (9, 96, 0.0, 96, 3, 0),
    (9, 512, 0.5, 256, 4, 64),  # mask blocks wider than a sweep segment: the block's mask is sliced
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols, pattern, blocksize, bits, groupsize", LAYERS)
def test_layer_matches_reference(interpret, poisoned_outputs, dtype, rows, cols, pattern, blocksize, bits,
                                 groupsize):
    if dtype != torch.float32 and cols > 260:
        pytest.skip("the half-precision cases repeat the fp32 ones on smaller layers")
    weight = weights(rows, cols, dtype)
    hinv = hinv_upper(cols)
    n, m = pattern if isinstance(pattern, tuple) else (0, 0)
    sparsity = 0.0 if n else pattern
    got = ops.sparsegpt_prune(weight, hinv, sparsity, n, m, blocksize, bits, groupsize)
    expected = reference.sparsegpt_prune(weight, hinv, sparsity, n, m, blocksize, bits, groupsize)
    pruned, loss, scale, zero = got
    pruned_ref, loss_ref, scale_ref, zero_ref = expected
    assert torch.equal(weight.to(pruned.dtype), weights(rows, cols, dtype).float()), "input modified"
    # Masks agree except where a kept weight happened to quantize to exactly 0.
    differ = (pruned == 0) != (pruned_ref == 0)
    if bits:
        differ &= ~((pruned == 0) & (pruned_ref.abs() < scale_ref.abs().max()))
    assert not differ.any(), f"{int(differ.sum())} mask entries differ"
    assert_close(pruned, pruned_ref, "pruned weight", atol=1e-4, rtol=1e-4)
    assert_close(loss, loss_ref, "loss", atol=1e-4, rtol=1e-4)
    if bits:
        assert_close(scale, scale_ref, "scale", atol=1e-5, rtol=1e-4)
        assert_close(zero, zero_ref, "zero", atol=0, rtol=0)
    zeros = (pruned == 0).float().mean().item()
    if n:
        assert (pruned.reshape(rows, -1, m) == 0).sum(-1).ge(n).all()
    elif not bits:
        assert abs(zeros - sparsity) < 1.5 / blocksize + 1e-6


def test_layer_fp64_runs_the_reference(interpret):
    weight = weights(5, 32, torch.float64)
    got = ops.sparsegpt_prune(weight, hinv_upper(32).double(), 0.5, 0, 0, 16, 0, 0)
    expected = reference.sparsegpt_prune(weight, hinv_upper(32).double(), 0.5, 0, 0, 16, 0, 0)
    assert got[0].dtype == torch.float64 and torch.equal(got[0], expected[0])


def test_segment_width_tiles_blocks_and_groups():
    assert sparsegpt_loop.segment_width(128, 4, 0) == 128
    assert sparsegpt_loop.segment_width(512, 0, 0) == 128
    assert sparsegpt_loop.segment_width(100, 4, 20) == 100
    assert sparsegpt_loop.segment_width(384, 0, 256) == 128
    width = sparsegpt_loop.segment_width(1000, 8, 0)
    assert 1000 % width == 0 and width % 8 == 0 and width <= 128


def test_tf32_lazy_update_emulation():
    x = torch.randn(1000) * 1e3
    rounded = reference.sparsegpt.round_to_tf32(x)
    assert (rounded.view(torch.int32) & 0x1FFF == 0).all(), "TF32 keeps 10 mantissa bits"
    assert ((rounded - x).abs() <= x.abs() * 2.0**-11).all()
    weight, hinv = weights(16, 256, torch.float32), hinv_upper(256)
    ieee = reference.sparsegpt_prune(weight, hinv, 0.5, 0, 0, 64, 0, 0, "ieee")[0]
    tf32 = reference.sparsegpt_prune(weight, hinv, 0.5, 0, 0, 64, 0, 0, "tf32")[0]
    assert not torch.equal(ieee, tf32), "the emulation must change the result"
    assert_close(tf32, ieee, "tf32 vs ieee", atol=0.05, rtol=0.05)


def test_lazy_update_matches_matmul(interpret):
    w = torch.randn(70, 150)
    err, hinv_rows = torch.randn(70, 37), torch.randn(37, 150)
    expected = w - err @ hinv_rows
    sparsegpt_sweep.lazy_update(w, err, hinv_rows)
    assert_close(w, expected, "W - E @ U", atol=1e-4)
    view = torch.randn(40, 90)
    target = view[:, 30:]  # a strided view is updated in place, its left columns untouched
    before = view.clone()
    sparsegpt_sweep.lazy_update(target, err[:40, :5], hinv_rows[:5, :60])
    assert torch.equal(view[:, :30], before[:, :30])
    assert_close(view[:, 30:], before[:, 30:] - err[:40, :5] @ hinv_rows[:5, :60], "strided update", atol=1e-4)


# -- selection ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 123), (37, 260), (1, 9000), (3, 1)])
@pytest.mark.parametrize("kind", ["random", "integer ties", "mostly zero"])
def test_lowest_k_mask_equals_reference(interpret, poisoned_outputs, shape, kind):
    generator = torch.Generator().manual_seed(3)
    values = torch.rand(shape, generator=generator) * 10
    if kind == "integer ties":
        values = values.floor()
    elif kind == "mostly zero":
        values = torch.where(torch.rand(shape, generator=generator) < 0.7, 0.0, values)
    numel = values.numel()
    for k in sorted({0, 1, numel // 3, numel // 2, numel - 1, numel}):
        got = select.lowest_k_mask(values, k)
        assert_mask(got, "mask")
        assert int(got.sum()) == k
        assert torch.equal(got, reference.tensor_mask(values, k)), f"k={k}"


def test_lowest_k_mask_orders_by_value_across_exponents(interpret):
    values = torch.tensor([1e-30, 0.0, -0.0, 3.0, 1e30, 2.0**-149, 1.0, 0.5])
    got = select.lowest_k_mask(values, 4)
    assert got.tolist() == [True, True, True, False, False, True, False, False]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", [0.5, 0.25, (2, 4), (4, 8)])
def test_magnitude_matches_reference(interpret, poisoned_outputs, dtype, pattern):
    n, m = pattern if isinstance(pattern, tuple) else (0, 0)
    sparsity = 0.0 if n else pattern
    weight = weights(37, 136, dtype)
    expected_weight = weight.clone()
    expected = reference.magnitude_prune(expected_weight, sparsity, n, m)
    scores = weight.abs().float()
    got = ops.magnitude_prune(weight, sparsity, n, m)
    assert_mask(got, "mask")
    if n:  # half-precision weights tie within a group; topk orders ties freely
        same = (got == expected).reshape(got.shape[0], -1, m).all(-1)
        assert (same | group_has_ties(scores, m)).all()
        check_nm_selection(scores, got, n, m)
    else:
        assert torch.equal(got, expected)
    assert torch.equal(weight, torch.where(got, 0, weights(37, 136, dtype)))


# -- through the driver -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, pattern", [("sparsegpt", "0.5"), ("sparsegpt", "2:4"), ("wanda", "0.5"),
                                             ("magnitude", "0.5")])
def test_driver_with_kernels_matches_reference(tiny_llama, method, pattern):
    """A whole (tiny) model pruned through the public ops on the interpreter equals the torch reference run."""
    import sparsekern

    calibration = torch.randint(0, 129, (4, 24), generator=torch.Generator().manual_seed(0))
    dense = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    pruned = {}
    previous = sparsekern.get_backend()
    try:
        for backend in ["torch", "interpret"]:
            sparsekern.set_backend(backend)
            tiny_llama.load_state_dict(dense)
            sparsekern.prune(tiny_llama, method=method, sparsity=pattern, calib=calibration, progress=False)
            pruned[backend] = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    finally:
        sparsekern.set_backend(previous)
    for name, expected in pruned["torch"].items():
        got = pruned["interpret"][name]
        assert torch.equal(got == 0, expected == 0), f"{name}: masks differ"
        assert_close(got, expected, name, atol=1e-4, rtol=1e-4)
