"""What recording progress for resume costs per decoder layer: time and disk, at SmolLM2 and LLaMA-7B sizes.

    python benchmarks/bench_resume.py                       # smollm2 and 7b, 128 x 2048 calibration tokens
    python benchmarks/bench_resume.py --sizes smollm2 --nsamples 8 --no-save   # a smoke run

One layer's commit (``sparsekern.resume.ResumeState.save``): its pruned linears' weights and the next layer's
inputs (nsamples x seqlen x hidden in the model's dtype) copied to the CPU, written as safetensors, fsynced,
checksummed and committed by the manifest's rename. ``blocking_ms`` is what the pruning loop waits for (the copy
to the CPU); the writes then run in a background thread while the next layer computes, and ``total_ms`` is the
whole commit. ``disk_bytes`` is the state on disk after the commit (the layer's weights and the inputs; earlier
layers' weights add to it). Random tensors: the cost does not depend on the values. Rows go to
results/resume.csv (median of ``--repeat`` commits).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows  # noqa: E402

from sparsekern.resume import ResumeState  # noqa: E402

# hidden, intermediate, dtype of the activations; linears per layer: q, k, v, o (hidden^2, k/v smaller with GQA
# ignored) and gate, up, down (hidden x intermediate).
SIZES = {"smollm2": (576, 1536, torch.float32), "7b": (4096, 11008, torch.float16)}


def layer_weights(hidden: int, intermediate: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    shapes = {f"self_attn.{p}_proj": (hidden, hidden) for p in "qkvo"}
    shapes.update({"mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
                   "mlp.down_proj": (hidden, intermediate)})
    return {name: torch.randn(shape, dtype=torch.float32).to(dtype) for name, shape in shapes.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="smollm2,7b")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the state is written (default: a temporary folder)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for size in args.sizes.split(","):
        hidden, intermediate, dtype = SIZES[size]
        weights = layer_weights(hidden, intermediate, dtype)
        inputs = [torch.randn(min(args.batch_size, args.nsamples - start), args.seqlen, hidden).to(dtype)
                  for start in range(0, args.nsamples, args.batch_size)]
        folder = Path(tempfile.mkdtemp(prefix="sparsekern-resume-", dir=args.dir))
        try:
            state = ResumeState(folder, "bench")
            blocking, total = [], []
            for layer in range(args.repeat):
                start = time.perf_counter()
                state.save(layer + 1, weights, inputs, [], 0.0)
                blocking.append((time.perf_counter() - start) * 1e3)
                state.wait()
                total.append((time.perf_counter() - start) * 1e3)
            layer_bytes = (folder / f"layer{args.repeat - 1:05d}.safetensors").stat().st_size
            input_bytes = (folder / f"hidden-{args.repeat:05d}.safetensors").stat().st_size
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        row = {"size": size, "hidden": hidden, "dtype": str(dtype).removeprefix("torch."), "nsamples": args.nsamples,
               "seqlen": args.seqlen, "blocking_ms": statistics.median(blocking),
               "total_ms": statistics.median(total), "layer_weight_bytes": layer_bytes, "input_bytes": input_bytes,
               "disk_bytes": layer_bytes + input_bytes, "repeat": args.repeat}
        rows.append(row)
        print(f"{size:<8} inputs {input_bytes / 2**30:6.2f} GiB + layer weights {layer_bytes / 2**30:5.2f} GiB: "
              f"blocking {row['blocking_ms']:8.0f} ms, whole commit {row['total_ms']:8.0f} ms (median of "
              f"{args.repeat})", flush=True)
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('resume', rows, torch.device('cpu'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
