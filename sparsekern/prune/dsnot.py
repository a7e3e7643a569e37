"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training"): training-free prune-and-grow refinement of a
pruned linear layer, run after any pruning method (magnitude, Wanda, SparseGPT), one layer at a time.

For output row i, with W the dense weight, W' the pruned one and mu_j = E[x_j] the mean calibration input, the
*expected reconstruction error* is

    e_i = sum_j (W_ij - W'_ij) * mu_j            (the mean of the row's output error over the calibration set)

DSnoT lowers |e_i| by swapping mask entries, one pair per row per cycle, never updating any weight value:

- grow (revive) a pruned j at its dense value; e_i falls by g_ij = W_ij * mu_j. Candidates must be
  sign-consistent, sign(g_ij) = sign(e_i) (reviving them moves e_i toward zero); among them the paper takes the
  largest |g_ij| / Var(x_j)^p: a low-variance input is one whose mean stands for every token, so correcting the
  mean with it also corrects the per-token error (p = ``pow_of_var_regrowing``).
- prune a kept j; e_i rises by p_ij = W'_ij * mu_j. Candidates are those whose removal does not push e_i away
  from zero, sign(p_ij) != sign(e_i); among them the paper takes the least Wanda importance |W'_ij| * ||x_j||_2.
  For N:M the pruned weight must lie in the revived weight's group of M, so every group keeps its zero count.

A row stops for good when |e_i| <= ``update_threshold``, when no candidate pair is left, or when the chosen swap
would overshoot (e_i would change sign), as in the paper's N:M code. Every accepted swap therefore lowers |e_i|
strictly, so the expected error sum_i e_i^2 never rises. The layer's real squared error on the calibration set,
n * sum_i (e_i^2 + dW_i^T Cov(x) dW_i), also has a covariance part that DSnoT does not look at and can raise.

Choices where this departs from the published code (github.com/zyxxmu/DSnoT, lib/prune.py), each to keep the
error monotone and the pattern exact: candidates are filtered by sign instead of walking a pre-sorted list past
its end; the overshoot test applies to unstructured too (the published default skips it there); N:M prunes by the
same sign-aware Wanda criterion instead of the initial method's score, and only grows in groups that still have a
prune candidate. As there, a revived weight is never pruned again and a pruned one never revived twice.
"""

from __future__ import annotations

import dataclasses

import torch

from ..patterns import PatternSpec, SparsityPattern
from .base import LinearResult, Step
from .registry import option, register
from .stats import MomentStats, part


@dataclasses.dataclass
class DSnoTOptions:
    """DSnoT's options (the paper's defaults). See :func:`dsnot_refine`."""

    max_cycles: int = option(50, "DSnoT: at most this many prune-and-grow swaps per output row",
                             check=lambda c: None if c >= 0 else "must be 0 or positive")
    update_threshold: float = option(0.1, "DSnoT: an output row stops once its expected error |e_i| is below this",
                                     check=lambda t: None if t >= 0 else "must be 0 or positive")
    pow_of_var_regrowing: float = option(1.0, "DSnoT: exponent of the input variance in the growing criterion",
                                         check=lambda p: None if p >= 0 else "must be 0 or positive")


@register
class DSnoT(Step):
    """``--refine dsnot``: DSnoT's swaps on each linear after the method (and the update), same pattern."""

    kind = "refine"
    name = "dsnot"
    Options = DSnoTOptions
    needs = frozenset({"moments"})

    def prepare(self, stats, where):
        return part(stats, MomentStats)

    def refine(self, dense: torch.Tensor, result: LinearResult, moments, pattern: SparsityPattern,
               where: str) -> LinearResult:
        device = result.weight.device
        weight, info = dsnot_refine(dense, result.weight, moments.mean.to(device), moments.var.to(device),
                                     moments.sumsq.to(device), pattern, mask=result.pruned(),
                                     where=where, **dataclasses.asdict(self.opts))
        return LinearResult(weight, loss=result.loss, damp=result.damp, mask=info["mask"])


def dsnot_refine(
    dense_weight: torch.Tensor,
    pruned_weight: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    sumsq: torch.Tensor,
    pattern: PatternSpec,
    *,
    mask: torch.Tensor | None = None,
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    pow_of_var_regrowing: float = 1.0,
    where: str = "dsnot_refine",
) -> tuple[torch.Tensor, dict]:
    """Refine the mask of one pruned linear layer with DSnoT's prune-and-grow cycles; no weight is updated.

    dense_weight: [rows, cols] the layer before pruning (revived weights take these values).
    pruned_weight: [rows, cols] the pruning method's output (kept weights may differ from dense, e.g. SparseGPT).
    mean, var, sumsq: [cols] per-input-channel E[x], Var[x] and E[x^2] over the calibration inputs
        (:class:`~sparsekern.prune.stats.MomentStats`); sqrt(sumsq) is Wanda's norm (its scale does not matter).
    pattern: the pattern ``pruned_weight`` follows; only N:M's M is used (swaps stay in one group of M);
        unstructured swaps stay in one row. Either way the zero count of every row / group is kept exactly.
    mask: bool [rows, cols], True where pruned; default ``pruned_weight == 0``.
    max_cycles: at most this many swaps per row.
    update_threshold: a row stops once |e_i| <= this. Units: e_i is built from per-token means here; the
        published code's statistic is a per-sequence sum, so its 0.1 corresponds to 0.1 / tokens-per-sequence.
    pow_of_var_regrowing: exponent p of Var(x_j) in the growing priority (0: ignore the variance).
    where: names the layer in error messages.

    Returns (refined weight in ``pruned_weight``'s dtype and device, info) with info keys ``mask`` (bool, True
    where pruned), ``cycles`` (cycles in which some row swapped), ``swaps`` (total), ``rows_changed``,
    ``expected_error_before`` and ``expected_error_after`` (sum_i e_i^2, floats).
    """
    pattern = SparsityPattern.parse(pattern)
    if dense_weight.dim() != 2 or dense_weight.shape != pruned_weight.shape:
        raise ValueError(f"{where}: dense_weight {tuple(dense_weight.shape)} and pruned_weight "
                         f"{tuple(pruned_weight.shape)} must be the same [rows, cols] matrix")
    rows, cols = pruned_weight.shape
    for name, stat in (("mean", mean), ("var", var), ("sumsq", sumsq)):
        if stat.shape != (cols,):
            raise ValueError(f"{where}: {name} has shape {tuple(stat.shape)}, expected ({cols},) (one per input)")
    if mask is not None and mask.shape != pruned_weight.shape:
        raise ValueError(f"{where}: mask has shape {tuple(mask.shape)}, expected {tuple(pruned_weight.shape)}")
    if max_cycles < 0 or update_threshold < 0 or pow_of_var_regrowing < 0:
        raise ValueError(f"{where}: max_cycles, update_threshold and pow_of_var_regrowing must be >= 0")
    pattern.check_columns(cols, where)

    device, f32 = pruned_weight.device, torch.float32
    dense = dense_weight.to(device, f32)
    pruned = mask.to(device, torch.bool).clone() if mask is not None else pruned_weight == 0
    current = pruned_weight.to(f32).masked_fill(pruned, 0.0)
    mu, variance = mean.to(device, f32), var.to(device, f32).clamp_min(0)
    norm = sumsq.to(device, f32).clamp_min(0).sqrt()

    grow_gain = dense * mu  # e_i falls by this when j is revived at its dense value
    prune_gain = current * mu  # e_i rises by this when kept j is zeroed
    err = ((dense - current) * mu).sum(dim=1)
    err_before = err.clone()
    # The overshoot test keeps every row's error on its initial side of zero, so its sign is fixed for the whole
    # run and the sign filters below can be applied once. A row with e_i = 0 has no sign-consistent candidate.
    sign = torch.sign(err)[:, None]

    # Growing priority, sign-consistent candidates only: |g| / Var^p, compared as log|g| - p log Var so that a
    # constant input (Var = 0: its mean is exact, the best possible correction) ranks first instead of dividing
    # by zero or overflowing.
    signed_gain = sign * grow_gain
    grow_score = signed_gain.clamp_min(0).log()
    if pow_of_var_regrowing:
        grow_score = grow_score - pow_of_var_regrowing * variance.log()
    grow_score = grow_score.masked_fill(~(pruned & (signed_gain > 0)), float("-inf"))
    # Pruning priority: least Wanda importance among kept weights whose removal does not push e_i away from zero.
    prune_score = (current.abs() * norm).masked_fill(~(~pruned & (sign * prune_gain <= 0)), float("inf"))

    row_ids = torch.arange(rows, device=device)
    active = err.abs() > update_threshold
    swaps = torch.zeros(rows, dtype=torch.long, device=device)
    cycles = 0
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        if pattern.is_nm:
            groups = prune_score.view(rows, cols // pattern.m, pattern.m)
            # Only grow where the same group can give a weight back, or the group's zero count would change.
            group_open = (groups < float("inf")).any(dim=2).repeat_interleave(pattern.m, dim=1)
            best_grow, grow_j = grow_score.masked_fill(~group_open, float("-inf")).max(dim=1)
            best_prune, k = groups[row_ids, grow_j // pattern.m].min(dim=1)
            prune_j = grow_j - grow_j % pattern.m + k
        else:
            best_grow, grow_j = grow_score.max(dim=1)
            best_prune, prune_j = prune_score.min(dim=1)
        new_err = err - grow_gain[row_ids, grow_j] + prune_gain[row_ids, prune_j]
        # Both candidates exist and the swap does not overshoot zero: then |e_i| strictly falls.
        accept = active & (best_grow > float("-inf")) & (best_prune < float("inf")) & (sign[:, 0] * new_err >= 0)
        # A row whose swap is refused stops for good (the paper's update mask); the others go on while above the
        # threshold.
        active = accept & (new_err.abs() > update_threshold)
        if not bool(accept.any()):
            break
        cycles += 1
        r, g, p = row_ids[accept], grow_j[accept], prune_j[accept]
        pruned[r, g], pruned[r, p] = False, True
        current[r, g], current[r, p] = dense[r, g], 0.0
        # Each weight moves at most once: a revived weight is not pruned again, a pruned one not revived again.
        grow_score[r, g], prune_score[r, p] = float("-inf"), float("inf")
        err = torch.where(accept, new_err, err)
        swaps += accept.long()

    err_after = ((dense - current) * mu).sum(dim=1)  # recomputed, not the running sum
    info = {
        "mask": pruned,
        "cycles": cycles,
        "swaps": int(swaps.sum()),
        "rows_changed": int((swaps > 0).sum()),
        "expected_error_before": float(err_before.square().sum()),
        "expected_error_after": float(err_after.square().sum()),
    }
    return current.to(pruned_weight.dtype), info
