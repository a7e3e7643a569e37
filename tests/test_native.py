"""The native extension sparsekern._C: built and loaded here, and its CUDA sources compiled with the machine's nvcc.

CI has no GPU, so the .cu files are compiled (not run) against the installed torch's headers for sm_90, which
catches a broken CUDA build before a GPU machine does. The CPU wheel of torch ships every header but one that
its CMake build generates (c10/cuda/impl/cuda_cmake_macros.h); the test writes that one line into a temporary
include folder.
"""

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from sparsekern import _native, ops

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def test_extension_is_built_and_loaded():
    if os.environ.get(_native.NO_EXT_VAR) == "1":
        pytest.skip(f"{_native.NO_EXT_VAR}=1: the reference fallback is in use on purpose")
    assert ops.NATIVE, "sparsekern._C did not load: rebuild with `pip install --no-build-isolation -e .` and read " \
                       "the compiler's output"
    for name in ["hinv_cholesky", "hinv_cholesky_", "cholesky_update", "cholesky_delete"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{name}", "CPU")


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def test_cuda_sources_compile_with_nvcc(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    shim = tmp_path / "include" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [str(tmp_path / "include"), *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    sources = sorted(CSRC.rglob("*.cu"))
    assert sources, "csrc/ has no .cu files"
    jobs = []
    for source in sources:  # in parallel: each takes most of a minute, nearly all of it in torch's headers
        command = [nvcc, "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o"), "-std=c++20",
                   "-gencode", "arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC",
                   *cpp_extension.COMMON_NVCC_FLAGS, *(f"-I{path}" for path in includes)]
        jobs.append((source, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failures = []
    for source, job in jobs:
        output, _ = job.communicate(timeout=600)
        if job.returncode:
            errors = [line for line in output.splitlines() if "error" in line]
            failures.append(f"{source.relative_to(CSRC)}:\n" + "\n".join(errors[:20] or output.splitlines()[-20:]))
    assert not failures, "nvcc failed:\n" + "\n\n".join(failures)
