"""Make ``sparsekern.triton_kernels`` importable from an uninstalled source checkout.

Installs map the top-level ``triton_kernels/`` folder to ``sparsekern.triton_kernels`` (setup.py's package_dir:
a top-level ``triton_kernels`` would clash with Triton's own package of that name). Running from the repo root
without installing (e.g. on a machine where ``pip install -e .`` is not possible) gets the same mapping from this
finder, which answers for that one package name only, and only when nothing else provides it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

PACKAGE = "sparsekern.triton_kernels"
_FOLDER = Path(__file__).resolve().parent.parent / "triton_kernels"


class _TritonKernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != PACKAGE:
            return None
        return importlib.util.spec_from_file_location(
            fullname, _FOLDER / "__init__.py", submodule_search_locations=[str(_FOLDER)]
        )


def install_if_needed() -> None:
    if (_FOLDER / "__init__.py").is_file() and importlib.util.find_spec(PACKAGE) is None:
        sys.meta_path.append(_TritonKernelsFinder())
