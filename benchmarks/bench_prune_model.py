"""Whole-model SparseGPT, reference ops vs fused kernels, in one run: wall time and peak GPU memory.

    python benchmarks/bench_prune_model.py                    # LLaMA-7B shape, 128 x 2048 tokens, on the GPU
    python benchmarks/bench_prune_model.py --config tiny --nsamples 4 --seqlen 64 --device cpu --no-save

The model has LLaMA-7B's shape (32 layers, hidden 4096, MLP 11008, 32 heads) and random weights (quality is
measured on SmolLM2 elsewhere; speed does not depend on the values). It stays in CPU memory and each decoder
layer visits the GPU, as ``sparsekern prune`` does. The same dense weights and calibration tokens are pruned
twice through ``sparsekern.prune``: once with every op on its PyTorch reference (backend ``torch``), once with
the fused kernels (backend ``cuda``). ``--layers`` prunes only the first layers of the model: each row then also
gives the time per layer and the whole model's time extrapolated from it (``extrapolated_model_s``, labelled so:
not measured). Rows, with the fused run's speedup over the reference in the same run, are appended to
results/prune_model.csv.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, speedups  # noqa: E402

CONFIGS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256),
}


def build_model(name: str, layers: int | None, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    options = dict(CONFIGS[name])
    if layers:
        options["num_hidden_layers"] = layers
    config = LlamaConfig(**options, max_position_embeddings=4096)
    torch.manual_seed(0)
    # Random initialization is quick on the GPU; the model is then kept in CPU memory (offloaded).
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.to("cpu").eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="7b", choices=list(CONFIGS))
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the real model")
    parser.add_argument("--pattern", default="0.5")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impls", default="reference,fused")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the "fused" run then uses the interpreter

    import sparsekern

    model = build_model(args.config, args.layers, getattr(torch, args.dtype), device)
    dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen), generator=generator)
    backends = {"reference": "torch", "fused": "cuda" if device.type == "cuda" else "interpret"}
    rows = []
    for impl in args.impls.split(","):
        model.load_state_dict(dense)
        sparsekern.set_backend(backends[impl])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        report = sparsekern.prune(model, method="sparsegpt", sparsity=args.pattern, calib=calibration, device=device,
                                  batch_size=args.batch_size, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        layers, model_layers = model.config.num_hidden_layers, CONFIGS[args.config]["num_hidden_layers"]
        row = {"config": args.config, "layers": layers, "pattern": args.pattern, "nsamples": args.nsamples,
               "seqlen": args.seqlen, "dtype": args.dtype, "impl": impl, "backend": backends[impl],
               "time_s": elapsed, "per_layer_s": elapsed / layers, "peak_gib": peak, "sparsity": report.sparsity}
        extrapolated = ""
        if layers < model_layers:
            row.update(model_layers=model_layers, extrapolated_model_s=elapsed / layers * model_layers)
            extrapolated = f"  ({model_layers} layers extrapolated: {row['extrapolated_model_s']:.0f} s)"
        rows.append(row)
        print(f"{impl:<10} {elapsed:8.1f} s for {layers} layers, {elapsed / layers:7.2f} s per layer{extrapolated}  "
              f"peak GPU memory {peak:6.2f} GiB  sparsity {report.sparsity:.4f}", flush=True)
    speedups(rows, rows[0], "time_s")
    if len(rows) == 2:
        print(f"{rows[1]['impl']} is {rows[1]['speedup']:.2f}x faster than {rows[0]['impl']} end to end")
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('prune_model', rows, device)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
