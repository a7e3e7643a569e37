"""The driver's part of layer-wise sparsity allocation (the rules are in ``sparsekern.prune.allocation``).

:func:`allocate` turns the recipe's allocation into per-linear pattern overrides before any layer is pruned. The
passes it may need run layer by layer like the pruning itself (each layer visits ``device``; the rest of the
model stays where it is): a dense pass collecting each linear's input norms (Wanda's ||X_j||), and, for the
sensitivity fit, one pass per candidate allocation that applies Wanda masks to a layer, moves the calibration
activations through it and puts the dense weights back, then scores the final hidden states with the model's own
head (its language-modelling loss on every ``HEAD_STRIDE``-th position of the calibration windows).
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .patterns import PatternSpec, SparsityPattern
from .pipeline import (_advance, _calibration_mode, _collect, _move_outside_layers, _no_cache_kwargs, _on_device,
                       _split_hidden, _swapped_forwards, capture_layer_inputs, find_decoder_layers, find_linears,
                       input_groups, weight_matrix)
from .prune import make_method
from .prune.allocation import Allocation, AllocationContext, from_file
from .prune.stats import NormStats, part


# A candidate allocation's calibration loss scores every 4th position of each window: every position still runs
# through the decoder layers, but the head (262k outputs on Gemma 3, most of a candidate pass there) runs on a
# quarter of them. The candidates are compared on the same positions.
HEAD_STRIDE = 4


def allocate(model: nn.Module, recipe, pattern: SparsityPattern, calibration: torch.Tensor | None,
             overrides: Mapping[str, PatternSpec | None] | None, device: torch.device, batch_size: int,
             progress: bool) -> tuple[dict[str, float], dict | None]:
    """(overrides giving each decoder layer its sparsity, the record for sparsity.json), or ({}, None) for uniform.

    The allocation covers the linears pruned with the default ``pattern`` (an override of the user's still wins
    over it for the linears it names); the layers' average over those parameters is exactly the target."""
    if recipe.allocation is None:
        return {}, None
    # (an N:M pattern with an allocation is refused earlier, by api.check_arguments)
    layers_name, layers = find_decoder_layers(model)
    names = [f"{layers_name}.{index}" for index in range(len(layers))]
    allocated = [{name: linear for name, linear in find_linears(layer).items()
                  if not any(fnmatch.fnmatchcase(f"{prefix}.{name}", glob) for glob in overrides or {})}
                 for prefix, layer in zip(names, layers)]
    weights = [float(sum(weight_matrix(linear).numel() for linear in linears.values())) for linears in allocated]
    if not any(weights):
        raise ValueError("--allocation: the overrides name every linear, so there is nothing left to allocate")
    weights = [w or 1e-30 for w in weights]  # a layer the overrides cover entirely: any sparsity, no weight
    if isinstance(recipe.allocation, str):
        sparsities = from_file(recipe.allocation, names, weights, pattern.sparsity)
        step_record = {"name": recipe.allocation}
    else:
        step: Allocation = recipe.allocation
        if calibration is None:
            raise ValueError(f"--allocation {step.name} needs calibration data")
        windows = step.calibration_windows()
        passes = _Passes(model, layers_name, layers, allocated, calibration[:windows] if windows else calibration,
                         device, batch_size, progress)
        context = AllocationContext(pattern.sparsity, weights, passes.layer_scores, passes.calibration_loss)
        with _calibration_mode(model):
            sparsities = step.allocate(context)
        step_record = {"name": step.name, **step.options()}
    record = {**step_record, "layers": {name: s for name, s in zip(names, sparsities)},
              "mean": sum(s * w for s, w in zip(sparsities, weights)) / sum(weights)}
    if progress:
        tqdm.write(f"allocation {step_record['name']}: " + " ".join(f"{s:.3f}" for s in sparsities)
                   + f" (mean {record['mean']:.4f} over the pruned parameters)")
    return {f"{name}.*": s for name, s in zip(names, sparsities)}, record


class _Passes:
    """The layer-by-layer passes an allocation may ask for, sharing one capture of the first layer's inputs."""

    def __init__(self, model, layers_name, layers, allocated, calibration, device, batch_size, progress):
        self.model, self.layers_name, self.layers, self.allocated = model, layers_name, layers, allocated
        self.batches = list(calibration.split(batch_size))
        self.device, self.progress = torch.device(device), progress
        self._norms = None
        self._inputs = None
        self._tensor_output = None  # whether the decoder layers return a tensor (else a tuple led by it)

    def _captured(self):
        if self._inputs is None:
            restore = _move_outside_layers(self.model, self.layers, self.device)
            try:
                self._inputs = capture_layer_inputs(self.model, self.layers, self.batches, self.device)
            finally:
                restore()
        hidden, calls = self._inputs
        return [h.clone() for h in hidden], calls

    def norms(self) -> list[dict[str, torch.Tensor]]:
        """Per layer: {linear name: ||X_j|| of its inputs} on the dense model."""
        if self._norms is None:
            hidden, calls = self._captured()
            wanda = make_method("wanda")
            self._norms = []
            for index, layer in enumerate(tqdm(self.layers, desc="allocation: dense statistics", unit="layer",
                                               disable=not self.progress, leave=False)):
                where = f"{self.layers_name}.{index}"
                linears = find_linears(layer)
                with _on_device(layer, self.device):
                    groups = input_groups(layer, linears, lambda: calls[index][0](layer, hidden[0]))
                    stats = _collect(wanda, layer, linears, groups, hidden, calls[index], self.device, where)
                    self._norms.append({name: part(stat, NormStats).norm.cpu()
                                        for group, stat in zip(groups, stats) for name in group})
                    _advance(layer, hidden, calls[index], where)
        return self._norms

    def layer_scores(self) -> list[list[torch.Tensor]]:
        """Per layer: the dense Wanda scores |W_ij| * ||X_j|| of each linear the allocation covers."""
        return [[weight_matrix(linear).detach().abs().float().cpu() * norms[name]
                 for name, linear in linears.items() if name in norms]
                for linears, norms in zip(self.allocated, self.norms())]

    def calibration_loss(self, sparsities: list[float]) -> float:
        """Mean next-token loss (every HEAD_STRIDE-th position) on the calibration windows with every covered linear
        Wanda-masked at its layer's sparsity (the dense weights are back afterwards)."""
        norms = self.norms()
        hidden, calls = self._captured()
        for index, layer in enumerate(self.layers):
            where = f"{self.layers_name}.{index}"
            with _on_device(layer, self.device), _masked(self.allocated[index], norms[index], sparsities[index]):
                _advance(layer, hidden, calls[index], where)
        return self._head_loss(hidden)

    def _head_loss(self, final: list[torch.Tensor]) -> float:
        """The model's loss when its decoder stack outputs ``final`` (the first layer hands it over, the others pass
        it on): embeddings, final norm and head run as the model runs them."""
        current: dict[str, Any] = {}

        def make_forward(index):
            def forward(*args, **kwargs):
                hidden, _ = _split_hidden(args, kwargs)
                out = current["hidden"].to(hidden.device) if index == 0 else hidden
                return out if current["tensor_output"] else (out,)
            return forward

        total, count = 0.0, 0
        restore = _move_outside_layers(self.model, self.layers, self.device)
        try:
            if self._tensor_output is None:  # the layers' output structure, from one real call (once)
                with _on_device(self.layers[0], self.device):
                    sample = self._inputs[1][0][0](self.layers[0], self._inputs[0][0])
                self._tensor_output = isinstance(sample, torch.Tensor)
            current["tensor_output"] = self._tensor_output
            # the head runs on the scored positions only where the forward takes logits_to_keep
            keep_logits = _accepts(self.model, "logits_to_keep")
            extra = _no_cache_kwargs(self.model)
            with _swapped_forwards(self.layers, make_forward):
                for batch, hidden in zip(self.batches, final):
                    current["hidden"] = hidden
                    batch = batch.to(self.device)
                    # every HEAD_STRIDE-th position, the last one included (positions whose next token is known)
                    keep = torch.arange(batch.shape[1] - 2, -1, -HEAD_STRIDE, device=self.device).flip(0)
                    if keep_logits:
                        logits = self.model(batch, logits_to_keep=keep, **extra).logits
                    else:
                        logits = self.model(batch, **extra).logits[:, keep]
                    targets = batch[:, keep + 1]
                    loss = torch.nn.functional.cross_entropy(
                        logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
                    total += loss.item()
                    count += targets.numel()
        finally:
            restore()
        return total / count


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the model's forward takes the keyword ``name`` (HF causal LMs take ``logits_to_keep``)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def _masked(linears: Mapping[str, nn.Module], norms: Mapping[str, torch.Tensor], sparsity: float):
    """Wanda's masks at ``sparsity`` on these linears for the duration; their dense weights are put back."""
    saved = {}
    try:
        for name, linear in linears.items():
            if name not in norms:
                continue
            view = weight_matrix(linear)
            saved[name] = view.detach().clone()
            scores = view.detach().abs().float() * norms[name].to(view.device)
            view.data.masked_fill_(ops.topk_mask(scores, sparsity, 0, 0, True), 0)
        yield
    finally:
        for name, dense in saved.items():
            weight_matrix(linears[name]).data.copy_(dense)
