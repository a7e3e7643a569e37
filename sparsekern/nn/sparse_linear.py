"""``SparseLinear``: an ``nn.Linear`` whose pruned weight is stored compressed, and ``sparsify(model)``.

The weight [N, K] is kept in one of the formats of ``sparsekern.formats`` as ordinary buffers, so ``state_dict``
saves them and ``load_state_dict`` restores them:
- ``2:4``: ``values`` [N, K/2] + ``meta`` [N, ceil(K/32)] int32, 56% of the dense fp16 bytes;
- ``bitmap`` (any unstructured mask): ``values`` [nnz] + ``bitmap`` [N, ceil(K/32)] int32 + ``offsets``
  [N, ceil(K/128)] int32, 58% of the dense fp16 bytes at 50% sparsity, 38% at 70%.
The forward pass picks an implementation by the number of input rows (``sparsekern.nn.dispatch``); every one of
them goes through the public custom ops, so ``torch.compile(fullgraph=True)`` traces it, and CPU tensors run the
PyTorch reference.

Channel permutation (``sparsekern.permute``, 2:4 only): a layer whose weight is 2:4 only in a permuted input
order, W[:, perm], stores that order compressed plus a ``perm`` buffer [K] int32, and computes x[..., perm] @
W[:, perm]^T = x @ W^T. The Triton kernel gathers x's columns as it loads them; the dense and semi-structured
(cuSPARSELt / CUTLASS) implementations, which cannot, gather x first (one index_select). ``to_dense`` returns the
weight in the original order.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import formats
from . import dispatch


class SparseLinear(nn.Module):
    """y = x W^T + b with W stored compressed in ``format`` ("2:4" or "bitmap")."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None, permuted: bool = False, format: str = "2:4",
                 shapes: dict[str, tuple[int, ...]] | None = None):
        """An all-zero layer to load a state_dict into (``from_dense`` builds one from a pruned linear).

        permuted: the layer has a ``perm`` buffer (identity until set or loaded); otherwise ``perm`` is None.
        shapes: {buffer: shape} of the tensors to be loaded, for the format's data-dependent sizes (the bitmap's
        number of kept values)."""
        super().__init__()
        fmt = formats.get(format)
        if permuted and not fmt.takes_perm:
            raise ValueError(f"the {format} format takes no input permutation (only 2:4 layers are channel-permuted)")
        self.in_features, self.out_features, self.format = in_features, out_features, fmt.name
        self._format = fmt  # the Format itself: no lookup per forward
        for name, tensor in fmt.empty(out_features, in_features, dtype, device, shapes).items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        # The stored weight's column j is input channel perm[j]; None: the identity (no gather).
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device) if permuted
                             else None)
        self._semi_structured = None  # PyTorch's 2:4 tensor, built on first use by that implementation

    @classmethod
    def from_dense(cls, linear: nn.Linear, name: str = "linear", perm: torch.Tensor | None = None,
                   format: str | None = None) -> "SparseLinear":
        """Compress a pruned ``nn.Linear``.

        format: "2:4" (ValueError naming ``name`` and the first group of 4 with more than 2 nonzeros), "bitmap"
        (any weight), or None: the smallest format that saves at least ``formats.MIN_SAVING`` of the dense bytes
        (ValueError if none does). perm [in_features] (integers, a permutation; e.g. from
        ``sparsekern.permute.nm_permutation``): the weight is 2:4 in that input order, ``linear.weight[:, perm]``,
        which is what is stored; the layer still computes ``linear(x)`` on inputs in the original order."""
        weight = linear.weight.detach()
        what = f"{name}.weight"
        if perm is not None:
            perm = check_perm(perm, linear.in_features, name).to(weight.device)
            weight = weight.index_select(1, perm)
            what = f"{name}.weight[:, perm]"
            format = format or "2:4"
        fmt = formats.get(format) if format else formats.choose(weight)
        if fmt is None:
            raise ValueError(
                f"{what} ({weight.shape[0]}x{weight.shape[1]}, {_zero_fraction(weight):.1%} zeros) would not be at "
                f"least {formats.MIN_SAVING:.0%} smaller in any sparse format: keep it dense, or pass format='bitmap'")
        buffers = fmt.compress(weight, what)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, weight.device,
                    permuted=perm is not None, format=fmt.name,
                    shapes={key: tuple(tensor.shape) for key, tensor in buffers.items()})
        for key, tensor in buffers.items():
            getattr(layer, key).copy_(tensor)
        if perm is not None:
            layer.perm.copy_(perm)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @property
    def compressed(self) -> dict[str, torch.Tensor]:
        """The format's tensors, by buffer name."""
        return {name: getattr(self, name) for name in self._format.buffers}

    @property
    def sparsity(self) -> float:
        """Fraction of the weight not stored (2:4: 0.5; bitmap: 1 - kept / (N K))."""
        total = self.out_features * self.in_features
        if self.format != "bitmap" or not total:
            return 0.5 if self.format == "2:4" else 0.0
        return 1.0 - self.values.numel() / total

    def weight_nbytes(self) -> int:
        """Bytes of the compressed weight (the format's tensors; not bias or perm)."""
        return sum(t.numel() * t.element_size() for t in self.compressed.values())

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (masked-dense weight, in the original input order)."""
        dtype = self.values.dtype
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.values.device,
                           dtype=dtype)
        with torch.no_grad():
            weight = self._format.decompress(self.compressed, self.in_features)
            if self.perm is not None:  # stored column j is input channel perm[j]
                weight = torch.empty_like(weight).index_copy_(1, self.perm.long(), weight)
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        fmt = self._format
        rules = dispatch.rules_for(x.device, self.format, self.values.dtype, self.out_features, self.in_features,
                                   self.sparsity)
        impl = dispatch.choose(rules, rows)
        if impl == "triton":  # the 2:4 kernel gathers x[..., perm] in its loads
            return fmt.linear(x, self.compressed, self.bias, self.perm)
        if self.perm is not None:  # the other implementations take the permuted x
            x = x.index_select(-1, self.perm)
        if impl == "semi_structured" and self.format == "2:4":
            return nn.functional.linear(x, self._semi_structured_weight(), self.bias)
        return nn.functional.linear(x, fmt.decompress(self.compressed, self.in_features).to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))

    def _semi_structured_weight(self) -> torch.Tensor:
        if self._semi_structured is None:
            from torch.sparse import to_sparse_semi_structured

            self._semi_structured = to_sparse_semi_structured(self._format.decompress(self.compressed,
                                                                                      self.in_features))
        return self._semi_structured

    def _apply(self, fn, recurse=True):
        self._semi_structured = None  # device or dtype changes: rebuild from the buffers when needed
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        kind = "2:4" if self.format == "2:4" else f"bitmap {self.sparsity:.1%} sparse"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{kind} compressed {str(self.values.dtype).removeprefix('torch.')}"
                + (", channel-permuted" if self.perm is not None else ""))


def _zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).float().mean()) if weight.numel() else 0.0


def check_perm(perm: torch.Tensor, in_features: int, name: str = "linear") -> torch.Tensor:
    """``perm`` as int64 if it is a permutation of 0..in_features-1, else ValueError naming the layer."""
    if perm.dim() != 1 or perm.numel() != in_features or perm.dtype.is_floating_point or perm.dtype == torch.bool:
        raise ValueError(f"{name}: perm must be an integer tensor [{in_features}], got {perm.dtype} "
                         f"{tuple(perm.shape)}")
    perm = perm.detach().long()
    if not torch.equal(perm.sort().values, torch.arange(in_features, device=perm.device)):
        raise ValueError(f"{name}: perm is not a permutation of 0..{in_features - 1}")
    return perm


def is_24(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 along the input dimension."""
    return formats.get("2:4").nbytes(weight) is not None


def tied_linears(model: nn.Module) -> set[str]:
    """Names of the linears whose weight another module shares (e.g. lm_head tied to the embeddings): they stay
    dense, since compressing one would untie it."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(name)
    return {name for names in owners.values() if len(set(names)) > 1 for name in names}


def sparsify(model: nn.Module, filter_fn: Callable[[str, nn.Linear], bool] | None = None,
             perms: dict[str, torch.Tensor] | None = None, format: str = "auto") -> list[str]:
    """Replace ``nn.Linear`` modules of ``model`` with ``SparseLinear``, in place; return the replaced names.

    format: "auto" stores each linear in the smallest format that fits it (2:4 where the weight is 2:4, else the
    bitmap) and saves at least ``formats.MIN_SAVING`` of its dense bytes; a linear none saves that much (a dense
    layer, the lm_head) stays an ``nn.Linear``. "2:4" or "bitmap": only that format. filter_fn(name, linear) ->
    bool picks the candidates instead, and each one is compressed even if that saves little; one that the format
    cannot hold (a non-2:4 weight with format "2:4") raises ValueError naming it, before anything is replaced.
    Linears whose weight is tied to another module's stay dense. perms: {linear name: input permutation} for
    layers pruned 2:4 in a permuted input order (``SparseLinear.from_dense``'s perm); their 2:4 test is on
    weight[:, perm].
    """
    if format != "auto":
        formats.get(format)
    perms = dict(perms or {})
    modules = dict(model.named_modules())
    unknown = sorted(name for name in perms if type(modules.get(name)) is not nn.Linear)
    if unknown:
        raise ValueError(f"perms names modules that are not nn.Linear layers of the model: {unknown}")
    tied = tied_linears(model)
    picked = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or name in tied:
            continue
        weight = module.weight.detach()
        permuted = name in perms
        if permuted:
            perms[name] = check_perm(perms[name], module.in_features, name).to(weight.device)
            weight = weight.index_select(1, perms[name])
        wanted = "2:4" if permuted else format
        if filter_fn is None:
            if wanted == "auto":  # choose() only returns a format that fits and saves MIN_SAVING
                fmt = formats.choose(weight, permuted)
            else:
                fmt = formats.get(wanted)
                size = fmt.nbytes(weight)
                if size is None or size > (1 - formats.MIN_SAVING) * formats.dense_nbytes(weight):
                    fmt = None
            if fmt is not None:
                picked.append((name, module, fmt.name))
        elif filter_fn(name, module):
            fmt = formats.get(wanted) if wanted != "auto" else (
                formats.choose(weight) or formats.get("bitmap"))
            what = f"{name}.weight[:, perm]" if permuted else f"{name}.weight"
            if fmt.nbytes(weight) is None:  # before any replacement: all or nothing
                fmt.compress(weight, what)  # raises, naming the layer and what does not fit
            picked.append((name, module, fmt.name))
    for name, module, fmt_name in picked:
        _set_submodule(model, name, SparseLinear.from_dense(module, name, perm=perms.get(name), format=fmt_name))
    return [name for name, _, _ in picked]


def sparsify_like(model: nn.Module, state_dict: dict) -> list[str]:
    """Prepare a freshly built dense ``model`` to load a state_dict saved from a sparsified one: every linear
    with a format's tensors in it (``values`` + ``meta``, or ``values`` + ``bitmap`` + ``offsets``) becomes an
    empty ``SparseLinear`` of that format and those sizes (then call load_state_dict); one with a ``perm`` entry
    gets a perm buffer for it."""
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        fmt = formats.of_buffers(key.removeprefix(f"{name}.") for key in state_dict
                                 if key.startswith(f"{name}.") and "." not in key.removeprefix(f"{name}."))
        if fmt is None:
            continue
        values = state_dict[f"{name}.values"]
        layer = SparseLinear(module.in_features, module.out_features, module.bias is not None, values.dtype,
                             module.weight.device, permuted=f"{name}.perm" in state_dict, format=fmt.name,
                             shapes={key: tuple(state_dict[f"{name}.{key}"].shape) for key in fmt.buffers})
        _set_submodule(model, name, layer)
        replaced.append(name)
    return replaced


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
