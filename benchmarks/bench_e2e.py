"""End to end: LLaMA-shaped models pruned 2:4 and unstructured (50%, 70%) vs the dense model, each sparsified
(SparseLinear: 2:4 or bitmap), decode tokens/s and prefill time, with a static KV cache and the decode step
compiled (CUDA graphs).

    python benchmarks/bench_e2e.py                                   # LLaMA-7B shape, fp16, batch 1 and 16
    python benchmarks/bench_e2e.py --patterns dense,0.7 --layers 8   # the 70% bitmap model only, 8 layers
    python benchmarks/bench_e2e.py --config tiny --device cpu --no-compile --new-tokens 4 --prompt 8 --no-save

Random weights (speed does not depend on the values). ``--patterns`` (default dense,2:4,0.5,0.7): "dense" is the
unpruned model (always measured: the baseline); "2:4" and an unstructured sparsity ("0.5", "0.7") prune every
decoder linear by magnitude per row in that pattern (``sparsekern.bench.prune_by_magnitude``) and swap them for
SparseLinear (``sparsekern.nn.sparsify``, whose "auto" format picks 2:4 for the 2:4 weights and the bitmap for
unstructured ones); each pattern builds the same random model afresh. Decode: ``new_tokens`` greedy tokens after
a ``prompt``-token prompt, timed after a warm-up generation; prefill: one forward over the prompt. With a static
cache on a GPU, ``generate`` compiles its decode step itself (transformers' automatic compilation: torch.compile,
mode "reduce-overhead"), during the warm-up; ``--compile-backend cudagraphs`` asks it for CUDA graphs of the
traced step without Inductor's code generation (compiles in a fraction of the time; the kernels stay cuBLAS and
sparsekern's); ``--no-compile`` runs everything eagerly with a dynamic cache, where at batch 1 the launch overhead
of the Python forward, not the weights, sets the pace. Rows (``pattern``, ``format``, ``variant`` dense or sparse,
``speedup``: decode tokens/s over the dense model's in the same run; ``prefill_speedup``) go to results/e2e.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune_model import CONFIGS  # noqa: E402
from common import append_rows  # noqa: E402


def build(config_name: str, layers: int | None, dtype: torch.dtype, device: torch.device, pattern: str = "dense"):
    """The random LLaMA-shaped model (the same weights for every pattern), its decoder linears pruned by magnitude
    in ``pattern`` unless "dense"."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsekern.bench import prune_by_magnitude

    options = dict(CONFIGS[config_name])
    if layers:
        options["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**options, max_position_embeddings=4096)).to(dtype).eval()
    if pattern != "dense":
        prune_by_magnitude(model, pattern)
    return model


def parse_patterns(text: str) -> list[str]:
    """The patterns to measure, "dense" first (always: the baseline), each checked."""
    patterns = ["dense"]
    for pattern in (p.strip() for p in text.split(",")):
        if pattern in patterns:
            continue
        if ":" in pattern:
            n, m = (int(part) for part in pattern.split(":"))
            if not 0 < n < m:
                raise ValueError(f"bad N:M pattern {pattern!r}")
        elif not 0 < float(pattern) < 1:
            raise ValueError(f"an unstructured sparsity must lie strictly between 0 and 1, got {pattern!r}")
        patterns.append(pattern)
    return patterns


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of fn() over ``repeat`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(model, batch: int, args, device: torch.device) -> dict:
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(1)).to(device)
    generate_options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                            pad_token_id=0)
    if args.no_compile:
        generate_options["disable_compile"] = True
    else:
        from transformers import CompileConfig

        generate_options["cache_implementation"] = "static"
        if args.compile_backend == "cudagraphs":  # Inductor's "mode" is not an option of this backend
            generate_options["compile_config"] = CompileConfig(backend="cudagraphs", mode=None)

    def decode():
        with torch.inference_mode():
            model.generate(prompt, **generate_options)

    def prefill():
        with torch.inference_mode():
            model(prompt)

    generate_s = timed(decode, device, args.repeat)
    prefill_s = timed(prefill, device, args.repeat)
    # Decode throughput: the generated tokens over the generation time net of its prefill.
    decode_s = max(generate_s - prefill_s, 1e-9)
    return {"batch": batch, "prompt": args.prompt, "new_tokens": args.new_tokens,
            "decode_tokens_per_s": batch * args.new_tokens / decode_s, "prefill_ms": prefill_s * 1e3,
            "generate_s": generate_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="7b", choices=list(CONFIGS))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--patterns", default="dense,2:4,0.5,0.7",
                        help="comma-separated: dense (always measured, the baseline), N:M such as 2:4, or an "
                             "unstructured sparsity such as 0.7 (magnitude-pruned, stored as a bitmap)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="eager forward, dynamic cache")
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "cudagraphs"],
                        help="how generate compiles the decode step (default: transformers' own, Inductor)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    try:
        patterns = parse_patterns(args.patterns)
    except ValueError as exc:
        parser.error(f"--patterns: {exc}")

    from sparsekern.nn import SparseLinear, sparsify

    # transformers compiles on accelerators only
    compiled = args.compile_backend if not args.no_compile and device.type == "cuda" else ""
    dtype = getattr(torch, args.dtype)
    rows = []
    for pattern in patterns:
        model = build(args.config, args.layers, dtype, device, pattern)
        fmt = "dense"
        if pattern != "dense":
            replaced = sparsify(model)  # "auto": 2:4 where the weight is 2:4, else the bitmap
            fmt = ",".join(sorted({m.format for m in model.modules() if isinstance(m, SparseLinear)})) or "dense"
            print(f"{pattern}: sparsified {len(replaced)} linears ({fmt})")
        torch._dynamo.reset()  # each model compiles afresh (over its SparseLinear modules)
        weights_gib = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30
        for batch in (int(b) for b in args.batches.split(",")):
            row = {"config": args.config, "layers": model.config.num_hidden_layers, "dtype": args.dtype,
                   "variant": "dense" if pattern == "dense" else "sparse", "pattern": pattern, "format": fmt,
                   "compiled": compiled, "weights_gib": weights_gib, **measure(model, batch, args, device)}
            rows.append(row)
            print(f"{pattern:<6} batch {batch:>3}: decode {row['decode_tokens_per_s']:9.1f} tokens/s, prefill "
                  f"{row['prefill_ms']:8.2f} ms, weights {weights_gib:.2f} GiB", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        dense = next(r for r in rows if r["pattern"] == "dense" and r["batch"] == row["batch"])
        row.update(baseline="dense", speedup=row["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
                   prefill_speedup=dense["prefill_ms"] / row["prefill_ms"])
        if row["pattern"] != "dense":
            print(f"{row['pattern']:<6} ({row['format']}) batch {row['batch']}: decode x{row['speedup']:.2f}, "
                  f"prefill x{row['prefill_speedup']:.2f}")
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('e2e', rows, device)}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
