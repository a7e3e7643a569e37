"""The optional native extension ``sparsekern._C`` (csrc/): loaded once, with one warning when it is missing.

``_C`` registers the Cholesky family (``sparsekern::hinv_cholesky``, ``hinv_cholesky_``, ``cholesky_update``,
``cholesky_delete``) with CPU and, when built with CUDA, CUDA kernels. Without it ``sparsekern.ops`` registers
the same schemas over the PyTorch reference, so every caller works either way, only slower and with more memory.
``SPARSEKERN_NO_EXT=1`` skips the build (setup.py) and the load (here), silently: it was asked for.
"""

from __future__ import annotations

import os
import warnings

NO_EXT_VAR = "SPARSEKERN_NO_EXT"


def load() -> bool:
    """Import ``sparsekern._C`` (registering its ops); False, after one warning, when it cannot be imported."""
    if os.environ.get(NO_EXT_VAR, "0") == "1":
        return False
    try:
        from . import _C  # noqa: F401  (importing registers the ops)
    except ImportError as exc:
        warnings.warn(
            f"sparsekern: the native extension sparsekern._C is not available ({exc}); the Cholesky ops "
            "(hinv_cholesky, cholesky_update, cholesky_delete) run the PyTorch reference, which is slower and "
            "needs more memory. Rebuild it with `pip install --no-build-isolation -e .` (a C++ compiler; for "
            f"CUDA also nvcc and CUDA_HOME), or set {NO_EXT_VAR}=1 to silence this.",
            stacklevel=3,
        )
        return False
    return True
