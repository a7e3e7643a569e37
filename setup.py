"""Build script for sparsekern.

Metadata lives in pyproject.toml; this file only says what gets packaged, because two things
cannot be written declaratively:

* ``triton_kernels/`` (a top-level folder of the repo) is installed as ``sparsekern.triton_kernels``.
  It must never be installed as a top-level ``triton_kernels``: Triton's project publishes a
  package of that name, and the two would shadow each other.
* the optional native extension ``sparsekern._C`` (csrc/, see csrc/README.md): a CppExtension on a CPU torch,
  a CUDAExtension when torch has CUDA and a toolkit is found (CUDA_HOME); TORCH_CUDA_ARCH_LIST and MAX_JOBS are
  honoured by torch's BuildExtension; SPARSEKERN_NO_EXT=1 skips it. A failed native build does not fail the
  install (the package falls back to the PyTorch reference with a warning); tests/test_native.py fails instead.
"""

import glob
import os

from setuptools import find_packages, setup

KERNELS_SRC = "triton_kernels"
KERNELS_PKG = "sparsekern.triton_kernels"

packages = find_packages(include=["sparsekern", "sparsekern.*"])
# The kernel folder and any sub-packages of it, renamed under sparsekern.
packages += [KERNELS_PKG] + [f"{KERNELS_PKG}.{p}" for p in find_packages(where=KERNELS_SRC)]



def native_extension():
    """(ext_modules, cmdclass) for sparsekern._C, or nothing when SPARSEKERN_NO_EXT=1."""
    if os.environ.get("SPARSEKERN_NO_EXT", "0") == "1":
        return [], {}
    import torch  # needs --no-build-isolation: an isolated build environment cannot see the installed torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        extension = cpp_extension.CUDAExtension(
            "sparsekern._C", cpp_sources + cuda_sources,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        )
    else:
        extension = cpp_extension.CppExtension("sparsekern._C", cpp_sources, extra_compile_args=["-O3"])
    extension.optional = True
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = native_extension()

setup(
    packages=packages,
    package_dir={KERNELS_PKG: KERNELS_SRC},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
