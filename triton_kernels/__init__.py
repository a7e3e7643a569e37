"""Raw ``@triton.jit`` kernels and their launchers, installed as ``sparsekern.triton_kernels``.

One module per op, named after it (``sparsegpt_sweep.py`` holds ``_sparsegpt_sweep_kernel`` and
the launcher ``sparsegpt_sweep``). No autograd, no ``nn``, no Hugging Face here: ``sparsekern.ops``
wraps these launchers as ``torch.library`` custom ops.

Import this package as ``sparsekern.triton_kernels``, never as a top-level ``triton_kernels``
(Triton's project ships a different package under that name).

Launchers allocate outputs with ``_outputs.new_output`` (NaN-poisoned in tests). Keep this file free of ``@triton.jit`` code: the
interpreter choice (``TRITON_INTERPRET``) is made when a kernel is decorated, so kernel modules must
only be imported once the backend is chosen.
"""

import os as _os

# Whether kernels decorated in this process run in Triton's interpreter: read once, at import, as @triton.jit
# itself decides interpreted vs compiled. The one place kernels ask (bf16 tl.dot is wrong in the interpreter, and
# some tiles are sized for it).
INTERPRETING = _os.environ.get("TRITON_INTERPRET") == "1"
