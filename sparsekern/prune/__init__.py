"""Pruning steps over the public ops: methods (mask selection, maybe with their own update), updates of the kept
weights, refinements, each registered with its options (see ``registry``); and the statistics they need.

Every module of this package is imported here, so a new method is one file with a ``@register``-ed class."""

from __future__ import annotations

import importlib
import os
import pkgutil

from .base import LinearResult, Method, ScoreMethod, Step
from .recipe import Recipe
from .registry import REGISTRY, option, option_specs, register, split_options
from .stats import HessianStats, LayerStats, NormStats

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .magnitude import Magnitude  # noqa: E402
from .obc import OBC  # noqa: E402
from .ria import RIA  # noqa: E402
from .sparsegpt import SparseGPT  # noqa: E402
from .wanda import Wanda  # noqa: E402

METHODS = REGISTRY["method"]  # name -> class, every registered method


def make_method(name: str, *, update: str = "none", refine: str = "none", allocation: str = "uniform",
                permute: bool = False, progress: bool = True, **options) -> Recipe:
    """The recipe for ``method`` (+ ``update``, + ``refine``, + ``allocation``: a registered one, "uniform", or the
    path of a JSON file), each step given the options it declares; ``permute``: channel permutation for N:M.

    options: {name: value}; None means "not given" (the step's default). An option none of the chosen steps takes
    is refused; so is an unknown method, update or refinement. progress: whether a step that shows its own
    progress bars (OBC, on large layers) shows them."""
    steps = []
    allocation_file = None
    for kind, chosen in (("method", name), ("update", update), ("refine", refine), ("allocation", allocation)):
        if chosen == {"update": "none", "refine": "none", "allocation": "uniform"}.get(kind):
            continue
        if kind == "allocation" and chosen not in REGISTRY[kind] and str(chosen).endswith(".json"):
            if not os.path.isfile(chosen):
                raise FileNotFoundError(f"--allocation {chosen}: no such file")
            allocation_file = str(chosen)
            continue
        if chosen not in REGISTRY[kind]:
            names = list(REGISTRY[kind]) + {"method": [], "update": ["none"], "refine": ["none"],
                                            "allocation": ["uniform", "a .json file"]}[kind]
            raise ValueError(f"unknown {kind} {chosen!r}; choose one of {', '.join(names)}")
        steps.append(REGISTRY[kind][chosen])
    built = []
    for cls, values in zip(steps, split_options(steps, options)):
        built.append(cls(progress=progress, **values) if cls is OBC else cls(**values))
    method = built[0]
    rest = {step.kind: step for step in built[1:]}
    return Recipe(method, rest.get("update"), rest.get("refine"), rest.get("allocation") or allocation_file,
                  permute)


__all__ = ["METHODS", "OBC", "REGISTRY", "HessianStats", "LayerStats", "LinearResult", "Magnitude", "Method",
           "NormStats", "RIA", "Recipe", "ScoreMethod", "SparseGPT", "Step", "Wanda", "make_method", "option",
           "option_specs", "register"]
