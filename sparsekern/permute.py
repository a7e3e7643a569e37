"""Channel permutations for N:M sparsity (Pool & Yu, "Channel Permutations for N:M Sparsity", NeurIPS 2021; the
channel reallocation and linear-sum-assignment refinement of RIA, Zhang et al., ICLR 2024).

N:M pruning keeps the m - n largest scores of every m consecutive input columns of each row. Which columns share
a group of m is an accident of the layout: reordering the input channels (one permutation for all the linears
that read the same input) changes what can be kept. ``nm_permutation`` looks for an order that keeps more total
score; at inference the weight is stored in that order and the kernel reads x[..., perm] (``SparseLinear``'s
``perm``), so the layer computes what the original-order masked weight does.

Scores are non-negative, so the kept score of a group is sum over rows of its m - n largest entries, and adding a
channel of scores s to a group whose (m - n)-th largest entry in row r is t_r (0 while the group has fewer than
m - n members) adds exactly sum_r max(0, s_r - t_r): the *hinge* of s over t. Both stages below are built on it:

1. Greedy balanced assignment. Channels in descending order of total score are dealt to the cols / m groups in
   m rounds of one channel per group (so every group ends with exactly m). In the first m - n rounds every group
   still keeps everything, so any deal is as good: the tiers are dealt in alternating directions (the largest
   channel of round 0 shares its group with the smallest of round 1, as RIA's heuristic reallocation does). In
   the later rounds each channel, in descending order, joins the group where its hinge is largest among the
   groups of its block still waiting for one this round (blocks below).
2. Refinement by linear sum assignment. Take one channel out of every group; the value of putting channel i back
   into group g is the kept score of g's other m - 1 members plus the hinge of i over their (m - n)-th largest,
   and ``scipy.optimize.linear_sum_assignment`` finds the best reassignment of all of them at once (the current
   one is a candidate). A sweep does this for each of the m positions of a group, the channels of every group
   reordered before it (at random every m sweeps, rotated by the group's index in between, so that two groups
   meet at every pair of positions); the refinement stops after ``max_sweeps`` sweeps, or after m sweeps in a row
   found nothing. The reassignment moves channels along cycles of groups; a cycle is applied only if the exactly
   recomputed kept score of its groups grows, so the refinement never loses score.

Cost. A hinge matrix between A channels and B groups is R * A * B subtractions (``torch.cdist`` with p = 1), so
groups are handled in blocks of ``block_groups``: an assignment step costs R * (cols / m) * block_groups, not
R * (cols / m)^2 (blocks are redrawn at random every step, so channels still travel across the whole matrix; when
cols / m <= block_groups there is one block, RIA's exact LSA). Measured on one core of the 2-core CI machine for
|W| * ||X||-like scores (half-normal weights, log-normal channel norms with outliers), 2:4 and the defaults
(block_groups 64, max_sweeps 2):

    scores         greedy only   greedy + 2 sweeps   + 4 sweeps   kept: identity / greedy / 2 sweeps / 4 sweeps
    4096 x 4096    1.5 s         6 s                 10 s         87.6% / 89.8% / 90.0% / 90.1% of the total
    4096 x 11008   4.7 s         17 s                29 s         87.6% / 89.8% / 90.0% / 90.1%

(a sweep costs about 2.3 s and 6 s; with a second thread on that busy machine everything was 3-8x slower: these
are many mid-sized tensor ops). On a GPU the same code runs on the scores' device; only the LSA runs on the CPU,
on block_groups x block_groups matrices. On 8 columns (2 groups, 2:4) the brute-force optimum is within 0.3% on
average with the defaults, 0.06% with 16 sweeps (tests/test_permute.py).

The result never keeps less than the identity: the refinement starts from the better of the greedy order and the
identity and only accepts gains, and the identity is returned unless the result beats it (a tie gives the
identity).
"""

from __future__ import annotations

import torch

from .ops import _check_nm

__all__ = ["kept_score", "nm_permutation"]


def kept_score(scores: torch.Tensor, perm: torch.Tensor | None, n: int, m: int) -> float:
    """Total score kept by N:M pruning of ``scores[:, perm]``: the sum over rows of the m - n largest of every m
    consecutive permuted columns, summed in float64. ``perm`` [cols] (any integer dtype) None is the identity."""
    _check_nm(scores, n, m, "scores")
    if perm is not None and perm.shape != (scores.shape[1],):
        raise ValueError(f"perm has shape {tuple(perm.shape)}, expected ({scores.shape[1]},)")
    rows, cols = scores.shape
    groups = cols // m
    if scores.numel() == 0:
        return 0.0
    order = torch.arange(cols, device=scores.device) if perm is None else perm.to(scores.device, torch.long)
    # Position j of every group side by side ([R, m, G]): position j of all groups is one slice for _top.
    permuted = scores.index_select(1, order.reshape(groups, m).T.reshape(-1)).reshape(rows, m, groups)
    top, _ = _top(list(permuted.unbind(1)), m - n, torch.float64)
    return float(top.sum())


def nm_permutation(scores: torch.Tensor, n: int, m: int, refine: bool = True, *, block_groups: int = 64,
                   max_sweeps: int = 2, seed: int = 0) -> torch.Tensor:
    """A permutation ``perm`` (int64 [cols], on scores' device) of the input channels such that N:M pruning of
    ``scores[:, perm]`` (keep the m - n largest of every m consecutive columns of each row) keeps at least as much
    total score as the identity, and more where the greedy assignment or its refinement finds it.

    scores [rows, cols] non-negative (e.g. |W| * ||X|| summed over the linears that read the same input, which
    share one permutation), cols a multiple of m, 0 < n < m. refine: run the linear-sum-assignment refinement
    (needs scipy). block_groups: groups per assignment block (cost grows linearly with it; see the module
    docstring). max_sweeps: at most this many refinement sweeps (m assignment steps each). seed: the random block
    partitions and within-group orders of the refinement (the result is deterministic for a seed).
    """
    _check_nm(scores, n, m, "scores")
    if block_groups < 1 or max_sweeps < 0:
        raise ValueError(f"block_groups must be >= 1 and max_sweeps >= 0, got {block_groups} and {max_sweeps}")
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise ValueError("scores must be finite and non-negative (importance scores such as |W| * ||X||)")
    rows, cols = scores.shape
    identity = torch.arange(cols, device=scores.device)
    if cols // m < 2 or rows == 0:
        return identity
    channels = scores.detach().T.float().contiguous()  # [C, R]: a channel's scores are one contiguous row

    keep = m - n
    base = _kept(channels, identity.reshape(-1, m), keep)
    # A permutation must beat the identity by more than float64 rounding of the sums: ties give the identity.
    margin = base * 1e-12
    perm = _greedy(channels, n, m, block_groups)
    if _kept(channels, perm.reshape(-1, m), keep) <= base + margin:
        perm = identity
    if refine and max_sweeps:
        perm = _refine(channels, perm, n, m, block_groups, max_sweeps, seed)
    return perm if _kept(channels, perm.reshape(-1, m), keep) > base + margin else identity


def _top(values: list[torch.Tensor], k: int, sum_dtype: torch.dtype | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the k largest (in sum_dtype, default the values'), k-th largest) elementwise over a list of
    same-shape tensors (k <= len(values)).

    k bubble passes of max/min (the i-th leaves the i-th largest at position i): for the small m of N:M this is
    several times faster than ``topk`` along a short last dimension."""
    v = list(values)
    for i in range(k):
        for j in range(len(v) - 1, i, -1):
            v[j - 1], v[j] = torch.maximum(v[j - 1], v[j]), torch.minimum(v[j - 1], v[j])
    total = v[0].to(sum_dtype or v[0].dtype)
    for i in range(1, k):
        total = total + v[i]
    return total, v[k - 1]


def _hinge(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[A, B] with entry (i, j) = sum_r max(0, a[i, r] - t[j, r]); a [A, R], t [B, R] fp32, contiguous rows.

    max(0, d) = (d + |d|) / 2, and the sum of |d| over r is ``torch.cdist`` with p = 1 (a vectorized L1 kernel)."""
    return 0.5 * (a.sum(1)[:, None] - t.sum(1)[None, :] + torch.cdist(a, t, p=1))


def _blocks(ids: torch.Tensor, block_groups: int) -> list[torch.Tensor]:
    """ids split into ceil(len / block_groups) blocks of nearly equal size (strided, so each mixes the range)."""
    count = -(-ids.numel() // block_groups)
    return [ids[b::count] for b in range(count)]


def _greedy(channels: torch.Tensor, n: int, m: int, block_groups: int) -> torch.Tensor:
    """The greedy balanced assignment; channels [C, R]. Returns the permutation (group g = positions g*m ...)."""
    cols = channels.shape[0]
    groups, keep = cols // m, m - n
    device = channels.device
    order = channels.sum(1).argsort(descending=True, stable=True)
    members = torch.empty(groups, m, dtype=torch.long, device=device)
    group_ids = torch.arange(groups, device=device)
    for j in range(m):
        tier = order[j * groups:(j + 1) * groups]  # descending totals
        if j < keep:  # every group still keeps all it has: any deal is as good; alternate directions
            members[:, j] = tier if j % 2 == 0 else tier.flip(0)
            continue
        # Groups g = b (mod blocks) form block b and take the tier's channels at positions = b (mod blocks):
        # both run down the same ranks, so every block gets a like share of large and small channels.
        for block in _blocks(group_ids, block_groups):
            incoming = tier[block]
            _, threshold = _top(list(channels[members[block, :j].T]), keep)  # [B, R]
            gain = _hinge(channels[incoming], threshold).cpu()  # [B channels, B groups]
            taken = torch.zeros(block.numel(), dtype=torch.bool)
            for i in range(block.numel()):  # in descending total: each to the best group still open this round
                g = int(gain[i].masked_fill(taken, float("-inf")).argmax())
                taken[g] = True
                members[block[g], j] = incoming[i]
    return members.reshape(cols)


def _refine(channels: torch.Tensor, perm: torch.Tensor, n: int, m: int, block_groups: int, max_sweeps: int,
            seed: int) -> torch.Tensor:
    """Linear-sum-assignment refinement of ``perm`` (see the module docstring); channels [C, R]."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as exc:  # pragma: no cover - scipy is a dependency
        raise ImportError("nm_permutation(refine=True) needs scipy (pip install scipy); or pass refine=False") from exc

    cols = channels.shape[0]
    groups, keep = cols // m, m - n
    device = channels.device
    gen = torch.Generator().manual_seed(seed)
    members = perm.reshape(groups, m).clone()
    # Group g rotated by g more positions each sweep: two groups g < h of a block meet at slot offsets t (h - g)
    # in sweep t, all m offsets within m sweeps when h - g is prime to m (always, for the two groups of 8 columns).
    rotate = (torch.arange(m)[None, :] + torch.arange(groups)[:, None]) % m
    idle = 0  # consecutive sweeps without a gain
    for sweep in range(max_sweeps):
        # A new order within each group, so that each step pulls a different mix of channels out of the groups:
        # random every m sweeps, rotations in between.
        order = torch.rand(groups, m, generator=gen).argsort(dim=1) if sweep % m == 0 else rotate
        members = members.gather(1, order.to(device))
        gained = False
        for slot in range(m):
            others = [j for j in range(m) if j != slot]
            for block in _blocks(torch.randperm(groups, generator=gen).to(device), block_groups):
                out = members[block, slot]  # [B]: one channel out of each group of the block
                top, threshold = _top(list(channels[members[block][:, others].T]), keep)  # [B, R] each
                value = top.sum(1)[None, :] + _hinge(channels[out], threshold)  # [B channels, B groups]
                _, into = linear_sum_assignment(value.double().cpu().numpy(), maximize=True)
                if (into == range(len(into))).all():
                    continue
                # The assignment moves channels along cycles of groups; each cycle is kept only if the exact kept
                # score of its groups grows (the proposal's hinge is fp32 arithmetic).
                before = members[block]
                after = before.clone()
                after[torch.as_tensor(into, device=device), slot] = out
                delta = _group_kept(channels, after, keep) - _group_kept(channels, before, keep)
                accept = torch.zeros(len(into), dtype=torch.bool)
                for cycle in _cycles(into):
                    accept[cycle] = bool(delta[cycle].sum() > 0)
                if accept.any():
                    accept = accept.to(device)
                    members[block[accept]] = after[accept]
                    gained = True
        idle = 0 if gained else idle + 1
        if idle == m:  # m sweeps (every pairing of positions) found nothing: a local optimum
            break
    return members.reshape(cols)


def _cycles(into) -> list[list[int]]:
    """The cycles (longer than 1) of the permutation i -> into[i]."""
    seen, cycles = [False] * len(into), []
    for start in range(len(into)):
        if seen[start] or into[start] == start:
            continue
        cycle, i = [], start
        while not seen[i]:
            seen[i] = True
            cycle.append(i)
            i = int(into[i])
        cycles.append(cycle)
    return cycles


def _group_kept(channels: torch.Tensor, members: torch.Tensor, keep: int) -> torch.Tensor:
    """Kept score of each group ``members`` [G', m] (channel ids), float64 [G'] (exact sums of the fp32 scores
    up to float64 rounding, so that equal selections compare equal); channels [C, R]."""
    top, _ = _top(list(channels[members.T]), keep, torch.float64)
    return top.sum(1).cpu()


def _kept(channels: torch.Tensor, members: torch.Tensor, keep: int) -> float:
    """Total kept score of the groups ``members`` [G', m] (channel ids); channels [C, R]."""
    top, _ = _top(list(channels[members.T]), keep, torch.float64)
    return float(top.sum())
