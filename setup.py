"""Build script for sparsekern.

Metadata lives in pyproject.toml; this file only says what gets packaged, because two things
cannot be written declaratively:

* ``triton_kernels/`` (a top-level folder of the repo) is installed as ``sparsekern.triton_kernels``.
  It must never be installed as a top-level ``triton_kernels``: Triton's project publishes a
  package of that name, and the two would shadow each other.
* the optional native extension ``sparsekern._C`` (not written yet, see csrc/README.md).
"""

import os

from setuptools import find_packages, setup

KERNELS_SRC = "triton_kernels"
KERNELS_PKG = "sparsekern.triton_kernels"

packages = find_packages(include=["sparsekern", "sparsekern.*"])
# The kernel folder and any sub-packages of it, renamed under sparsekern.
packages += [KERNELS_PKG] + [f"{KERNELS_PKG}.{p}" for p in find_packages(where=KERNELS_SRC)]

# SPARSEKERN_NO_EXT=1 skips the native extension. Today there is none, so the flag changes nothing;
# the native-ops issue adds sparsekern._C here (torch.utils.cpp_extension over csrc/<op>/),
# built only when SPARSEKERN_NO_EXT is unset and a compiler/CUDA toolkit is present.
BUILD_NATIVE = os.environ.get("SPARSEKERN_NO_EXT", "0") != "1"
ext_modules = []
cmdclass = {}

setup(
    packages=packages,
    package_dir={KERNELS_PKG: KERNELS_SRC},
    # The measured 2:4 dispatch table ships with the package (sparsekern/nn/dispatch.py reads it).
    package_data={"sparsekern.nn": ["dispatch_table.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
