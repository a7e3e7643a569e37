"""Channel permutations for N:M sparsity (sparsekern.permute): valid permutations that never keep less score than
the identity, strictly more where the identity packs a row's large scores into one group, close to the brute-force
optimum on 8 columns, and kept_score against a topk oracle."""

import itertools
import statistics

import pytest
import torch

from sparsekern.permute import kept_score, nm_permutation


def oracle_kept(scores, perm, n, m):
    """Kept score by topk over the permuted groups, in float64."""
    rows, cols = scores.shape
    permuted = scores.double()[:, perm]
    return float(permuted.reshape(rows, cols // m, m).topk(m - n, dim=-1).values.sum())


def channel_scores(rows, cols, seed=0):
    """|W| * ||X||-like scores: half-normal weights times log-normal channel norms with a few outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    norms = torch.exp(torch.randn(cols, generator=gen))
    norms[torch.randperm(cols, generator=gen)[: max(1, cols // 50)]] *= 30
    return torch.randn(rows, cols, generator=gen).abs() * norms


def assert_permutation(perm, cols):
    assert perm.dtype == torch.int64 and perm.shape == (cols,)
    assert torch.equal(perm.sort().values, torch.arange(cols)), "not a permutation"


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8)])
def test_kept_score_matches_topk(n, m):
    scores = torch.rand(7, 5 * m, generator=torch.Generator().manual_seed(n * m))
    perm = torch.randperm(5 * m, generator=torch.Generator().manual_seed(1))
    assert kept_score(scores, perm, n, m) == pytest.approx(oracle_kept(scores, perm, n, m), rel=1e-6)
    assert kept_score(scores, None, n, m) == pytest.approx(oracle_kept(scores, torch.arange(5 * m), n, m), rel=1e-6)
    assert kept_score(scores.half(), perm.int(), n, m) == pytest.approx(
        oracle_kept(scores.half().float(), perm, n, m), rel=1e-3)


@pytest.mark.parametrize("refine", [True, False])
@pytest.mark.parametrize("rows, cols, n, m, block_groups", [
    (16, 64, 2, 4, 64),  # one block: every assignment over all groups
    (32, 1024, 2, 4, 16),  # 256 groups in blocks of 16
    (24, 96, 4, 8, 64),
    (9, 36, 1, 4, 4),  # 9 groups: 3 blocks of 3
    (5, 12, 3, 4, 64),
])
def test_valid_and_never_below_identity(refine, rows, cols, n, m, block_groups):
    for seed, scores in enumerate([channel_scores(rows, cols), torch.rand(rows, cols)]):
        perm = nm_permutation(scores, n, m, refine=refine, block_groups=block_groups, seed=seed)
        assert_permutation(perm, cols)
        assert kept_score(scores, perm, n, m) >= kept_score(scores, None, n, m)
        assert oracle_kept(scores, perm, n, m) >= oracle_kept(scores, torch.arange(cols), n, m) * (1 - 1e-9)


def test_channel_like_scores_gain():
    """On |W| * ||X||-like scores the greedy alone and the refinement each keep more (several blocks)."""
    scores = channel_scores(64, 1024, seed=3)
    identity = kept_score(scores, None, 2, 4)
    greedy = kept_score(scores, nm_permutation(scores, 2, 4, refine=False, block_groups=32), 2, 4)
    refined = kept_score(scores, nm_permutation(scores, 2, 4, block_groups=32), 2, 4)
    assert greedy > identity * 1.01  # outlier channels no longer share groups
    assert refined > greedy  # the refinement starts from the greedy result and only accepts gains


def test_strictly_more_when_identity_packs_the_large_scores():
    """Each row's 4 large scores sit in one group of 4 (so the identity keeps 2 of them); spread out, all are kept."""
    rows, cols = 8, 32
    scores = torch.full((rows, cols), 0.01)
    for r in range(rows):
        group = r % (cols // 4)
        scores[r, 4 * group:4 * group + 4] = 10.0 + r
    identity = kept_score(scores, None, 2, 4)
    for refine in (False, True):
        perm = nm_permutation(scores, 2, 4, refine=refine)
        assert_permutation(perm, cols)
        kept = kept_score(scores, perm, 2, 4)
        assert kept > identity
    # All 4 large scores of every row kept (and the best of the rest): the optimum.
    best = sum(4 * (10.0 + r) for r in range(rows)) + 0.0
    assert kept >= best


def test_identity_when_nothing_beats_it():
    """Every group already keeps all its nonzeros: the identity is optimal and is what comes back."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 16, generator=gen)
    scores.reshape(6, 4, 4)[..., 2:] = 0  # at most 2 nonzeros per group of 4 in every row
    assert torch.equal(nm_permutation(scores, 2, 4), torch.arange(16))
    assert torch.equal(nm_permutation(torch.zeros(3, 8), 2, 4), torch.arange(8))
    assert torch.equal(nm_permutation(torch.rand(3, 4), 2, 4), torch.arange(4))  # a single group


def test_deterministic_for_a_seed():
    scores = channel_scores(16, 256, seed=5)
    assert torch.equal(nm_permutation(scores, 2, 4, block_groups=16, seed=7),
                       nm_permutation(scores, 2, 4, block_groups=16, seed=7))


def brute_force(scores, n, m):
    """Best kept score over all partitions of 8 columns into 2 groups of 4 (35 of them)."""
    cols = scores.shape[1]
    best = 0.0
    for first in itertools.combinations(range(1, cols), m - 1):  # the group holding channel 0
        group = (0, *first)
        perm = torch.tensor(list(group) + [c for c in range(cols) if c not in group])
        best = max(best, kept_score(scores, perm, n, m))
    return best


@pytest.mark.parametrize("n", [1, 2, 3])
def test_close_to_brute_force_on_8_columns(n):
    """Greedy + LSA against all 35 partitions of 8 columns into two groups, N:4, on 60 random matrices each of
    uniform and channel-like scores. With 2 groups a refinement step can only swap one pair of channels, so the
    default 2 sweeps leave more on the table than 16 (cheap at this size). Measured for 2:4: greedy alone mean gap
    0.76% (max 5.3%); default sweeps 0.29% (max 1.8%); 16 sweeps 0.06% (max 0.8%), optimal in 74% of the cases
    (1:4 and 3:4: 98% and 96%)."""
    gaps, long_gaps, greedy_gaps = [], [], []
    for seed in range(60):
        gen = torch.Generator().manual_seed(seed)
        for scores in (torch.rand(6, 8, generator=gen), channel_scores(6, 8, seed=seed)):
            best = brute_force(scores, n, 4)
            identity = kept_score(scores, None, n, 4)
            greedy = kept_score(scores, nm_permutation(scores, n, 4, refine=False), n, 4)
            refined = kept_score(scores, nm_permutation(scores, n, 4), n, 4)
            longer = kept_score(scores, nm_permutation(scores, n, 4, max_sweeps=16), n, 4)
            # Each stage starts from the previous one's result and only accepts gains.
            assert identity <= greedy <= refined <= longer * (1 + 1e-12) and longer <= best * (1 + 1e-6)
            gaps.append((best - refined) / best)
            long_gaps.append((best - longer) / best)
            greedy_gaps.append((best - greedy) / best)
    optimal = sum(gap <= 1e-6 for gap in long_gaps) / len(long_gaps)
    print(f"\n{n}:4 gap to brute force: greedy alone mean {statistics.mean(greedy_gaps):.2e} max "
          f"{max(greedy_gaps):.2e}; default sweeps mean {statistics.mean(gaps):.2e} max {max(gaps):.2e}; 16 sweeps "
          f"mean {statistics.mean(long_gaps):.2e} max {max(long_gaps):.2e}, optimal {optimal:.0%}")
    assert statistics.mean(gaps) < 0.6 * statistics.mean(greedy_gaps) and statistics.mean(gaps) < 5e-3
    assert statistics.mean(long_gaps) < 2e-3 and max(long_gaps) < 3e-2 and optimal > 0.5


@pytest.mark.parametrize("scores, n, m, match", [
    (torch.rand(4, 10), 2, 4, "not divisible by M=4"),
    (torch.rand(4, 8), 4, 4, "0 < N < M"),
    (torch.rand(8), 2, 4, "2-D"),
    (-torch.rand(4, 8), 2, 4, "non-negative"),
    (torch.full((4, 8), float("nan")), 2, 4, "finite"),
])
def test_bad_arguments(scores, n, m, match):
    with pytest.raises(ValueError, match=match):
        nm_permutation(scores, n, m)
