"""``SparseLinear``: an ``nn.Linear`` whose 2:4 weight is stored compressed, and ``sparsify(model)``.

The weight [N, K] is kept as ``values`` [N, K/2] and ``meta`` [N, ceil(K/32)] int32 buffers (the format of
``sparsekern.reference.sparse24``): about 56% of the dense fp16 bytes. They are ordinary buffers, so
``state_dict`` saves them and ``load_state_dict`` restores them. The forward pass picks an implementation by the
number of input rows (``sparsekern.nn.dispatch``); every one of them goes through the public custom ops, so
``torch.compile(fullgraph=True)`` traces it, and CPU tensors run the PyTorch reference.

Channel permutation (``sparsekern.permute``): a layer whose weight is 2:4 only in a permuted input order,
W[:, perm], stores that order compressed plus a ``perm`` buffer [K] int32, and computes x[..., perm] @ W[:, perm]^T
= x @ W^T. The Triton kernel gathers x's columns as it loads them; the dense and semi-structured (cuSPARSELt /
CUTLASS) implementations, which cannot, gather x first (one index_select). ``to_dense`` returns the weight in the
original order.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import ops
from ..reference.sparse24 import check_24
from . import dispatch


class SparseLinear(nn.Module):
    """y = x W^T + b with W 2:4-sparse and stored compressed."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None, permuted: bool = False):
        """permuted: the layer has a ``perm`` buffer (identity until set or loaded); otherwise ``perm`` is None."""
        super().__init__()
        if in_features % 4:
            raise ValueError(f"in_features {in_features} is not a multiple of 4, so the layer cannot be 2:4")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=dtype, device=device))
        self.register_buffer("meta", torch.zeros(out_features, -(-in_features // 32), dtype=torch.int32,
                                                 device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        # The stored weight's column j is input channel perm[j]; None: the identity (no gather).
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device) if permuted
                             else None)
        self._semi_structured = None  # PyTorch's 2:4 tensor, built on first use by that implementation

    @classmethod
    def from_dense(cls, linear: nn.Linear, name: str = "linear", perm: torch.Tensor | None = None) -> "SparseLinear":
        """Compress a 2:4-sparse ``nn.Linear``; raises ValueError naming ``name`` and the first dense group.

        perm [in_features] (integers, a permutation; e.g. from ``sparsekern.permute.nm_permutation``): the weight
        is 2:4 in that input order, ``linear.weight[:, perm]``, which is what is stored; the layer still computes
        ``linear(x)`` on inputs in the original order."""
        weight = linear.weight.detach()
        what = f"{name}.weight"
        if perm is not None:
            perm = check_perm(perm, linear.in_features, name).to(weight.device)
            weight = weight.index_select(1, perm)
            what = f"{name}.weight[:, perm]"
        check_24(weight, what=what)  # names the layer; compress_24 alone could only say "weight"
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, weight.device,
                    permuted=perm is not None)
        values, meta = ops.compress_24(weight)
        layer.values.copy_(values)
        layer.meta.copy_(meta)
        if perm is not None:
            layer.perm.copy_(perm)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (masked-dense weight, in the original input order)."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.values.device,
                           dtype=self.values.dtype)
        with torch.no_grad():
            weight = ops.decompress_24(self.values, self.meta)
            if self.perm is not None:  # stored column j is input channel perm[j]
                weight = torch.empty_like(weight).index_copy_(1, self.perm.long(), weight)
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        rules = dispatch.rules_for(x.device, self.values.dtype, self.out_features, self.in_features)
        impl = dispatch.choose(rules, rows)
        if impl == "triton":  # gathers x[..., perm] in its loads
            return ops.sparse24_linear(x, self.values, self.meta, self.bias, self.perm)
        if self.perm is not None:  # the other implementations take the permuted x
            x = x.index_select(-1, self.perm)
        if impl == "semi_structured":
            return nn.functional.linear(x, self._semi_structured_weight(), self.bias)
        return nn.functional.linear(x, ops.decompress_24(self.values, self.meta).to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))

    def _semi_structured_weight(self) -> torch.Tensor:
        if self._semi_structured is None:
            from torch.sparse import to_sparse_semi_structured

            self._semi_structured = to_sparse_semi_structured(ops.decompress_24(self.values, self.meta))
        return self._semi_structured

    def _apply(self, fn, recurse=True):
        self._semi_structured = None  # device or dtype changes: rebuild from the buffers when needed
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"2:4 compressed {str(self.values.dtype).removeprefix('torch.')}"
                + (", channel-permuted" if self.perm is not None else ""))


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
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight.detach().reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all())


def sparsify(model: nn.Module, filter_fn: Callable[[str, nn.Linear], bool] | None = None,
             perms: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Replace ``nn.Linear`` modules of ``model`` with ``SparseLinear``, in place; return the replaced names.

    filter_fn(name, linear) -> bool picks the candidates; without one, every linear whose weight is 2:4 is
    replaced and the others (embeddings, lm_head, layers left dense) are kept. A linear that filter_fn picks but
    is not 2:4 raises ValueError naming it and its first dense group. perms: {linear name: input permutation} for
    layers pruned 2:4 in a permuted input order (``SparseLinear.from_dense``'s perm); their 2:4 test is on
    weight[:, perm].
    """
    perms = dict(perms or {})
    modules = dict(model.named_modules())
    unknown = sorted(name for name in perms if type(modules.get(name)) is not nn.Linear)
    if unknown:
        raise ValueError(f"perms names modules that are not nn.Linear layers of the model: {unknown}")
    picked = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        weight = module.weight.detach()
        if name in perms:
            perms[name] = check_perm(perms[name], module.in_features, name).to(weight.device)
            weight = weight.index_select(1, perms[name])
        if filter_fn is None and is_24(weight):
            picked.append((name, module))
        elif filter_fn is not None and filter_fn(name, module):
            # before any replacement: all or nothing
            check_24(weight, what=f"{name}.weight[:, perm]" if name in perms else f"{name}.weight")
            picked.append((name, module))
    for name, module in picked:
        _set_submodule(model, name, SparseLinear.from_dense(module, name, perm=perms.get(name)))
    return [name for name, _ in picked]


def sparsify_like(model: nn.Module, state_dict: dict) -> list[str]:
    """Prepare a freshly built dense ``model`` to load a state_dict saved from a sparsified one: every linear
    with ``values``/``meta`` entries in it becomes an empty ``SparseLinear`` (then call load_state_dict); one with a
    ``perm`` entry gets a perm buffer for it."""
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and f"{name}.values" in state_dict:
            values = state_dict[f"{name}.values"]
            layer = SparseLinear(module.in_features, module.out_features, module.bias is not None, values.dtype,
                                 module.weight.device, permuted=f"{name}.perm" in state_dict)
            _set_submodule(model, name, layer)
            replaced.append(name)
    return replaced


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
