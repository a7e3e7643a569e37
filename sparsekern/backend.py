"""Which implementation the public ops run: compiled Triton/CUDA, the Triton interpreter, or the PyTorch reference.

- ``cuda``: compiled Triton kernels and native CUDA ops, for tensors on a GPU.
- ``interpret``: the same Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (CI's kernel tests).
- ``torch``: the pure-PyTorch reference (``sparsekern.reference``), the oracle and the CPU fallback.

The choice is made once, lazily (never querying the device at import time), and can be forced with the
environment variable ``SPARSEKERN_BACKEND`` or :func:`set_backend`. Triton reads ``TRITON_INTERPRET`` when a
kernel is decorated, so choosing ``interpret`` through the environment sets it before any kernel module is
imported; choosing it later with :func:`set_backend` only works if the kernels were not imported yet.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("cuda", "interpret", "torch")
ENV_VAR = "SPARSEKERN_BACKEND"

_chosen: str | None = None


def _validate(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


if os.environ.get(ENV_VAR, "").strip().lower() == "interpret":
    # Must happen before any @triton.jit runs (see module docstring).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def get_backend() -> str:
    """The active backend, decided on first use."""
    global _chosen
    if _chosen is None:
        env = os.environ.get(ENV_VAR)
        if env:
            _chosen = _validate(env)
        elif os.environ.get("TRITON_INTERPRET") == "1":
            _chosen = "interpret"
        elif torch.cuda.is_available():
            _chosen = "cuda"
        else:
            _chosen = "torch"
    return _chosen


def set_backend(name: str) -> None:
    """Force a backend for the rest of the process."""
    global _chosen
    _chosen = _validate(name)
    if _chosen == "interpret":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def backend_for(tensor: torch.Tensor) -> str:
    """The backend that can run on ``tensor``: compiled kernels need a GPU tensor, the interpreter a CPU one."""
    chosen = get_backend()
    if chosen == "cuda" and tensor.device.type != "cuda":
        return "torch"
    if chosen == "interpret" and tensor.device.type != "cpu":
        return "torch"
    return chosen
