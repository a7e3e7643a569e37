"""Does SparseGPT's arithmetic precision change the pruned model's quality? Perplexity of SmolLM2-135M on held-out
Lee text after SparseGPT with each precision choice, over several calibration seeds (the noise floor).

    python benchmarks/bench_precision.py                      # 50% and 2:4, seeds 0,1,2 (CPU: ~25 min)
    python benchmarks/bench_precision.py --patterns 0.5 --seeds 0

Variants:
- baseline: fp32 Hessian inputs, fp32 ("ieee") lazy-update GEMM: the reference.
- lazy tf32: the lazy update W[:, i2:] -= Err @ U[i1:i2, i2:] with operands rounded to TF32 (what tensor cores
  do on a GPU; emulated by rounding on the CPU reference).
- hessian bf16 / fp16: calibration inputs cast to half precision before H = 2/n X^T X accumulates them in fp32
  (what half-precision tensor cores compute).
Rows are appended to results/precision.csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows  # noqa: E402

VARIANTS = {  # name -> prune() options
    "baseline": {},
    "lazy tf32": {"lazy_precision": "tf32"},
    "hessian bf16": {"hessian_dtype": "bfloat16"},
    "hessian fp16": {"hessian_dtype": "float16"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--patterns", default="0.5,2:4")
    parser.add_argument("--seeds", default="0,1,2", help="calibration-window seeds")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    import sparsekern
    from sparsekern.data import calibration_windows, eval_tokens, window_bos
    from sparsekern.eval import perplexity
    from sparsekern.models import load_model

    device = torch.device(args.device)
    model, tokenizer = load_model(args.model, dtype="float32", device=args.device)
    dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    held_out = eval_tokens(tokenizer, "lee", "test")
    rows = []
    for pattern in args.patterns.split(","):
        for variant in args.variants.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                model.load_state_dict(dense)
                calibration = calibration_windows(tokenizer, "lee", nsamples=args.nsamples, seqlen=args.seqlen,
                                                  seed=seed)
                start = time.perf_counter()
                sparsekern.prune(model, method="sparsegpt", sparsity=pattern, calib=calibration, device=device,
                                 progress=False, **VARIANTS[variant])
                elapsed = time.perf_counter() - start
                ppl = perplexity(model, held_out, seqlen=args.seqlen, progress=False,
                                 bos_token_id=window_bos(tokenizer))["perplexity"]
                rows.append({"model": args.model, "pattern": pattern, "variant": variant, "seed": seed,
                             "nsamples": args.nsamples, "seqlen": args.seqlen, "backend": sparsekern.get_backend(),
                             "perplexity": ppl, "prune_s": elapsed})
                print(f"{pattern:>4} {variant:<13} seed {seed}: perplexity {ppl:8.3f}  ({elapsed:.0f} s)", flush=True)
    print("\nmean perplexity over seeds (spread = max - min):")
    for pattern in args.patterns.split(","):
        for variant in args.variants.split(","):
            values = [r["perplexity"] for r in rows if r["pattern"] == pattern and r["variant"] == variant]
            print(f"{pattern:>4} {variant:<13} {statistics.mean(values):8.3f}  spread {max(values) - min(values):.3f}")
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('precision', rows, device)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
