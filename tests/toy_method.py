"""A whole pruning method in one file, as a user would add one: the registry test imports it and expects to see it in
``sparsekern.prune`` and the CLI without touching anything else. It prunes the weights whose |W| ** strength is
lowest per row (no calibration data)."""

import dataclasses

from sparsekern.prune import ScoreMethod, option, register


@dataclasses.dataclass
class ToyOptions:
    toy_strength: float = option(1.0, "toy: exponent of |W|", check=lambda s: None if s > 0 else "must be positive")


@register
class Toy(ScoreMethod):
    name = "toy"
    Options = ToyOptions

    def score(self, weight, prepared):
        return weight.abs() ** self.opts.toy_strength
