"""SparseGPT's production layer loop (``prune.sparsegpt_loop.blocked_prune``) against the reference's own loop,
on CPU with the reference sweep plugged in: segment widths other than the reference's, odd shapes, unstructured,
N:M, quantization groups narrower and wider than a segment. The fused kernels in the same loop are compared with
the reference in test_sparsegpt_sweep.py."""

import pytest
import torch

from sparsekern import reference
from sparsekern.prune.sparsegpt_loop import blocked_prune


def hinv_upper(n, seed=0):
    x = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    upper, _ = reference.hinv_cholesky(2 * x.T @ x / x.shape[0], 0.01, 1)
    return upper


def loop_with_reference_sweep(weight, hinv, sparsity, n, m, blocksize, bits, groupsize, width):
    def sweep_into(segment, hinv_block, prune_mask, scale, zero, segment_groupsize, losses):
        q, err, loss, _ = reference.sparsegpt_sweep(segment, hinv_block, prune_mask, n, m, bits, scale, zero,
                                                    segment_groupsize)
        segment.copy_(q)
        losses += loss
        return err

    def lazy_update(rest, err, hinv_rows):
        rest -= err @ hinv_rows

    return blocked_prune(weight.clone(), hinv, sparsity, n, blocksize, bits, groupsize, width, reference.tensor_mask,
                         sweep_into, lazy_update)


LAYERS = [  # rows, cols, pattern (sparsity | (n, m)), blocksize, bits, groupsize, loop segment width
    (5, 123, 0.5, 32, 0, 0, 8),  # ragged last block and segment
    (7, 130, 0.6, 40, 0, 0, 20),
    (9, 77, 0.3, 77, 0, 0, 11),  # one block, odd width
    (6, 132, (2, 4), 44, 0, 0, 4),
    (5, 136, (4, 8), 136, 0, 0, 24),  # segments do not tile the block: the last one is cut at the layer's end
    (11, 120, (1, 4), 60, 0, 0, 12),
    (9, 120, 0.5, 60, 4, 0, 20),  # one grid per row
    (9, 120, 0.5, 60, 3, 10, 20),  # groups inside a segment
    (9, 120, (2, 4), 60, 4, 60, 20),  # a group spans segments
    (7, 150, 0.5, 30, 4, 60, 30),  # a group spans blocks
]


@pytest.mark.parametrize("rows, cols, pattern, blocksize, bits, groupsize, width", LAYERS)
def test_loop_matches_reference(rows, cols, pattern, blocksize, bits, groupsize, width):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols), dtype=torch.float64)
    hinv = hinv_upper(cols, seed=rows)
    n, m = pattern if isinstance(pattern, tuple) else (0, 0)
    sparsity = 0.0 if n else pattern
    got = loop_with_reference_sweep(weight, hinv, sparsity, n, m, blocksize, bits, groupsize, width)
    expected = reference.sparsegpt_prune(weight, hinv, sparsity, n, m, blocksize, bits, groupsize)
    assert torch.equal(got[0] == 0, expected[0] == 0), "masks differ"
    for name, a, b in zip(("pruned weight", "loss", "scale", "zero"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda text: f"{name}: {text}")


@pytest.mark.parametrize("pattern, bits, groupsize", [(0.5, 0, 0), ((2, 4), 0, 0), (0.5, 4, 8), ((2, 4), 3, 64)])
def test_loop_is_bit_identical_at_the_reference_width(pattern, bits, groupsize):
    """Same segments as the reference (fp32): the same operations in the same order, so the same bits."""
    rows, cols, blocksize = 13, 200, 64
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    hinv = hinv_upper(cols).float()
    n, m = pattern if isinstance(pattern, tuple) else (0, 0)
    sparsity = 0.0 if n else pattern
    got = loop_with_reference_sweep(weight, hinv, sparsity, n, m, blocksize, bits, groupsize,
                                    reference.sparsegpt.SWEEP_WIDTH)
    expected = reference.sparsegpt_prune(weight, hinv, sparsity, n, m, blocksize, bits, groupsize)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
