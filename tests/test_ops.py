"""The public ops: registered under sparsekern::, fake implementations consistent (opcheck), argument checks."""

import pytest
import torch

from sparsekern import ops, reference


def spd(n, seed=0):
    x = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(seed))
    return 2 * x.T @ x / x.shape[0]


def test_ops_are_registered_under_one_namespace():
    for name in ["nm_mask", "wanda_prune", "magnitude_prune", "hessian_update", "sumsq_update", "hinv_cholesky",
                 "hinv_cholesky_", "cholesky_update", "cholesky_delete",
                 "sparsegpt_sweep", "sparsegpt_prune", "compress_24", "decompress_24", "sparse24_linear",
                 "compress_bitmap", "decompress_bitmap", "bitmap_linear"]:
        assert hasattr(torch.ops.sparsekern, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_masks_and_wanda(dtype):
    scores = torch.rand(5, 124).to(dtype)
    torch.library.opcheck(ops.nm_mask, (scores, 2, 4))
    torch.library.opcheck(ops.wanda_prune, (torch.randn(5, 124).to(dtype), torch.rand(124), 0.5, 0, 0))
    torch.library.opcheck(ops.wanda_prune, (torch.randn(5, 124).to(dtype), torch.rand(124), 0.0, 2, 4))
    torch.library.opcheck(ops.magnitude_prune, (torch.randn(5, 124).to(dtype), 0.5, 0, 0))


def test_opcheck_statistics_and_sparsegpt():
    torch.library.opcheck(ops.hessian_update, (torch.zeros(12, 12), torch.randn(2, 7, 12), 3))
    torch.library.opcheck(ops.sumsq_update, (torch.zeros(12), torch.randn(7, 12), 0))
    torch.library.opcheck(torch.ops.sparsekern.hinv_cholesky.default, (spd(12), 0.01, 2))
    upper, _ = ops.hinv_cholesky(spd(32), 0.01, 1)
    for args in [(torch.randn(5, 32), upper, 0.5, 0, 0, 16, 0, 0), (torch.randn(5, 32), upper, 0.0, 2, 4, 16, 4, 8),
                 (torch.randn(5, 32).to(torch.bfloat16), upper, 0.5, 0, 0, 8, 3, 0)]:
        torch.library.opcheck(ops.sparsegpt_prune, args)


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_opcheck_sweep_and_kernels(backend, request):
    if backend == "interpret":
        request.getfixturevalue("interpret")
    upper, _ = ops.hinv_cholesky(spd(32), 0.01, 1)
    block = torch.randn(5, 32)
    mask = torch.rand(5, 32) < 0.5
    torch.library.opcheck(ops.sparsegpt_sweep, (block, upper, mask, 0, 0, 0, None, None, 0))
    torch.library.opcheck(ops.sparsegpt_sweep, (block, upper, None, 2, 4, 4, torch.zeros(5, 4), torch.zeros(5, 4), 8))
    torch.library.opcheck(ops.sparsegpt_prune, (torch.randn(5, 32), upper, 0.5, 0, 0, 16, 4, 8, "tf32"))
    torch.library.opcheck(ops.hessian_update, (torch.zeros(12, 12), torch.randn(2, 7, 12).half(), 3))
    torch.library.opcheck(ops.sumsq_update, (torch.zeros(12), torch.randn(7, 12).bfloat16(), 0))
    torch.library.opcheck(ops.magnitude_prune, (torch.randn(5, 124), 0.5, 0, 0))


def test_ops_match_reference():
    weight = torch.randn(7, 64)
    upper, _ = ops.hinv_cholesky(spd(64), 0.01, 1)
    got = ops.sparsegpt_prune(weight, upper, 0.5, 2, 4, 32, 0, 0)
    expected = reference.sparsegpt_prune(weight, upper, 0.5, 2, 4, 32, 0, 0)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_fake_shapes_under_torch_compile():
    upper, _ = ops.hinv_cholesky(spd(32), 0.01, 1)

    def prune(w):
        return ops.sparsegpt_prune(w, upper, 0.5, 0, 0, 16, 4, 8)

    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake_w = torch.empty(6, 32)
        fake_u = torch.empty(32, 32)
        pruned, loss, scale, zero = ops.sparsegpt_prune(fake_w, fake_u, 0.5, 0, 0, 16, 4, 8)
    assert pruned.shape == (6, 32) and loss.shape == (6,) and scale.shape == zero.shape == (6, 4)


@pytest.mark.parametrize("call, words", [
    (lambda: ops.nm_mask(torch.rand(4, 30), 2, 4), "not divisible by M=4"),
    (lambda: ops.nm_mask(torch.rand(4, 32), 4, 4), "0 < N < M"),
    (lambda: ops.wanda_prune(torch.randn(4, 32), torch.rand(31), 0.5, 0, 0), "act_norm has shape"),
    (lambda: ops.magnitude_prune(torch.randn(4, 32), 1.0, 0, 0), "outside"),
    (lambda: ops.hinv_cholesky(torch.randn(4, 5), 0.01, 1), "square"),
    (lambda: ops.sparsegpt_prune(torch.randn(4, 32), torch.eye(16), 0.5, 0, 0, 16, 0, 0), "hinv_upper has shape"),
    (lambda: ops.sparsegpt_prune(torch.randn(4, 32), torch.eye(32), 0.5, 0, 0, 16, 0, 0, "fp16"), "lazy_precision"),
    (lambda: ops.sparsegpt_sweep(torch.randn(4, 32), torch.eye(16), None, 0, 0, 0, None, None, 0), "hinv_block"),
    (lambda: ops.sparsegpt_sweep(torch.randn(4, 32), torch.eye(32), None, 0, 0, 4, None, None, 0), "scale and zero"),
    (lambda: ops.sparsegpt_sweep(torch.randn(4, 30), torch.eye(30), None, 2, 4, 0, None, None, 0), "divisible"),
])
def test_argument_errors(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_usable_under_torch_compile_fullgraph():
    upper, _ = ops.hinv_cholesky(spd(32), 0.01, 1)

    def prune(w, norm):
        pruned, loss, _, _ = ops.sparsegpt_prune(w, upper, 0.5, 2, 4, 16, 0, 0)
        mask = ops.nm_mask(pruned.abs() * norm, 2, 4)
        return pruned, loss.sum(), mask

    weight, norm = torch.randn(6, 32), torch.rand(32)
    compiled = torch.compile(prune, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(weight, norm), prune(weight, norm)):
        torch.testing.assert_close(got, expected)
