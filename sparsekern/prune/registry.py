"""The registry of pruning steps, and how each declares its options once.

A step is a class with a ``name``, a ``kind`` ("method": chooses the mask, maybe updating the weights; "update":
reconstructs the kept weights on a given mask; "refine": improves a mask after the fact; "allocation": spreads the
target sparsity over the decoder layers) and an ``Options``
dataclass whose fields are declared with :func:`option`. ``@register`` adds it to :data:`REGISTRY`. Everything else
is derived from these declarations: ``sparsekern.prune(**options)`` checks types and values from them, the CLI has
one ``--flag`` per option name, and ``sparsity.json`` records ``dataclasses.asdict`` of each step's options.

Adding a method is one module in ``sparsekern/prune/`` with a ``@register``-ed class: the package imports every
module in it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

KINDS = ("method", "update", "refine", "allocation")

REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}


def option(default: Any, help: str, *, choices: tuple | None = None,
           check: Callable[[Any], str | None] | None = None) -> Any:
    """A dataclass field for a step's option. ``check(value)`` returns an error text (the fix included) or None."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "check": check})


@dataclasses.dataclass
class NoOptions:
    """The options of a step that takes none."""


def register(cls: type) -> type:
    """Class decorator: add a step to :data:`REGISTRY` under its ``kind`` and ``name``."""
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__}.kind must be one of {KINDS}, got {cls.kind!r}")
    known = REGISTRY[cls.kind].get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"two {cls.kind}s are named {cls.name!r}: {known.__qualname__} and {cls.__qualname__}")
    REGISTRY[cls.kind][cls.name] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One option as the CLI and the API see it: its name, type, and the steps that take it (with defaults)."""

    name: str
    type: type  # int, float, str or bool
    optional: bool  # None is a valid value (e.g. "as the model produces them")
    choices: tuple | None
    help: str
    takers: dict  # "kind name" -> default

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _field_type(options_cls: type, field: dataclasses.Field) -> tuple[type, bool]:
    hint = typing.get_type_hints(options_cls)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:  # Optional[X] / X | None
        return args[0], True
    return hint, False


def option_specs() -> dict[str, OptionSpec]:
    """Every option of every registered step, merged by name (steps sharing a name must agree on its type)."""
    specs: dict[str, OptionSpec] = {}
    for kind in KINDS:
        for name, cls in REGISTRY[kind].items():
            for field in dataclasses.fields(cls.Options):
                kind_type, optional = _field_type(cls.Options, field)
                taker = f"{kind} {name}"
                spec = specs.get(field.name)
                if spec is None:
                    specs[field.name] = OptionSpec(field.name, kind_type, optional, field.metadata.get("choices"),
                                                   field.metadata.get("help", ""), {taker: field.default})
                    continue
                if spec.type is not kind_type:
                    raise TypeError(f"option {field.name!r} is {spec.type.__name__} for {', '.join(spec.takers)} "
                                    f"but {kind_type.__name__} for {taker}")
                spec.takers[taker] = field.default
    return specs


def check_value(spec: OptionSpec, value: Any, check: Callable | None = None) -> None:
    """TypeError/ValueError naming the option when ``value`` does not fit it (bool is not an int here)."""
    if value is None:
        if spec.optional:
            return
        raise TypeError(f"option {spec.name} must be {spec.type.__name__}, got None")
    accepted = (int, float) if spec.type is float else (spec.type,)
    if not isinstance(value, accepted) or (spec.type is not bool and isinstance(value, bool)):
        raise TypeError(f"option {spec.name} must be {spec.type.__name__}, got {type(value).__name__} {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"{spec.flag} {value!r} is not one of {', '.join(map(str, spec.choices))}")
    problem = check(value) if check is not None else None
    if problem:
        raise ValueError(f"{spec.flag} {value!r}: {problem}")


def build_options(cls: type, values: dict[str, Any]) -> Any:
    """``cls.Options`` from the values given for its fields (missing ones take their defaults), each checked."""
    specs = option_specs()
    fields = {field.name: field for field in dataclasses.fields(cls.Options)}
    taken = {}
    for name, value in values.items():
        field = fields[name]
        check_value(specs[name], value, field.metadata.get("check"))
        taken[name] = float(value) if specs[name].type is float and value is not None else value
    return cls.Options(**taken)


def split_options(steps: list[type], values: dict[str, Any]) -> list[dict[str, Any]]:
    """Hand each step the options it declares, from ``values`` ({name: value}; None means "not given").

    An option no registered step declares is a TypeError; one that only steps not chosen declare is a ValueError
    naming the steps that take it."""
    specs = option_specs()
    given = {name: value for name, value in values.items() if value is not None}
    for name in values:
        if name not in specs:
            raise TypeError(f"unknown option {name!r}; the options are: {', '.join(sorted(specs))}")
    per_step = [{} for _ in steps]
    for name, value in given.items():
        takers = [i for i, cls in enumerate(steps) if name in {f.name for f in dataclasses.fields(cls.Options)}]
        if not takers:
            chosen = ", ".join(f"{cls.kind} {cls.name}" for cls in steps)
            raise ValueError(f"{specs[name].flag} is not an option of the chosen steps ({chosen}); it is taken by: "
                             f"{', '.join(specs[name].takers)}")
        for i in takers:
            per_step[i][name] = value
    return per_step
