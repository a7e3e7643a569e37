"""sparsekern: one-shot pruning of large language models (SparseGPT, Wanda, magnitude; unstructured and N:M),
with fused GPU kernels for the pruning inner loops, 2:4 and unstructured (bitmap) sparse layers for inference
(``sparsify``), and compressed checkpoints (``load``)."""

__version__ = "0.1.0"

from . import _source_tree  # noqa: E402

_source_tree.install_if_needed()

from .api import PruneReport, prune  # noqa: E402
from .backend import get_backend, set_backend  # noqa: E402
from .patterns import SparsityPattern  # noqa: E402

# The inference side is imported on first use: it loads torch._dynamo (~2.5 s of CPU), which pruning never needs.
_LAZY = {"load": ".checkpoint", "SparseLinear": ".nn", "sparsify": ".nn"}


_LAZY_MODULES = {"checkpoint", "formats", "nn"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY_MODULES:  # ``sparsekern.checkpoint.save_compressed(...)`` after a bare ``import sparsekern``
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparsekern' has no attribute {name!r}")

__all__ = ["PruneReport", "SparseLinear", "SparsityPattern", "__version__", "get_backend", "load", "prune",
           "set_backend", "sparsify"]
