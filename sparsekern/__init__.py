"""sparsekern: one-shot pruning of large language models (SparseGPT, Wanda, magnitude; unstructured and N:M),
with fused GPU kernels for the pruning inner loops, 2:4 and unstructured (bitmap) sparse layers for inference
(``sparsify``), and compressed checkpoints (``load``)."""

__version__ = "0.1.0"

from . import _source_tree  # noqa: E402

_source_tree.install_if_needed()

from .api import PruneReport, prune  # noqa: E402
from .backend import get_backend, set_backend  # noqa: E402
from .checkpoint import load  # noqa: E402
from .nn import SparseLinear, sparsify  # noqa: E402
from .patterns import SparsityPattern  # noqa: E402

__all__ = ["PruneReport", "SparseLinear", "SparsityPattern", "__version__", "get_backend", "load", "prune",
           "set_backend", "sparsify"]
