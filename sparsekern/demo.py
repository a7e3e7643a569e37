"""``make demo``: prune SmolLM2-135M six ways and compare perplexity on held-out Lee news text.

Runs on 2 CPU cores in about ten minutes: ADMM (the default method) 50% and 2:4, SparseGPT 50% and 2:4, Wanda 50%
and magnitude 50%, each from the same dense weights and the same calibration windows, then prints a table of
method, pattern, achieved sparsity, perplexity and pruning time (plus the dense model's perplexity).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

RUNS = [("admm", "0.5"), ("admm", "2:4"), ("sparsegpt", "0.5"), ("sparsegpt", "2:4"), ("wanda", "0.5"),
        ("magnitude", "0.5")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekern.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    import sparsekern
    from sparsekern.data import calibration_windows, eval_tokens, window_bos
    from sparsekern.eval import perplexity
    from sparsekern.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, dtype="float32", device=args.device)
    dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    calibration = calibration_windows(tokenizer, "lee", nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    held_out = eval_tokens(tokenizer, "lee", "test")

    def measure() -> float:
        return perplexity(model, held_out, seqlen=args.seqlen, progress=not args.quiet,
                          bos_token_id=window_bos(tokenizer))["perplexity"]

    rows = [{"method": "dense", "pattern": "-", "sparsity": 0.0, "perplexity": measure(), "time_s": 0.0}]
    for method, pattern in RUNS:
        model.load_state_dict(dense)
        start = time.perf_counter()
        report = sparsekern.prune(model, tokenizer, method=method, sparsity=pattern, calib=calibration,
                                  device=args.device, progress=not args.quiet)
        elapsed = time.perf_counter() - start
        rows.append({"method": method, "pattern": pattern, "sparsity": report.sparsity,
                     "perplexity": measure(), "time_s": elapsed})

    if args.json:
        print(json.dumps({"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
                          "eval_tokens": held_out.shape[1], "device": args.device, "rows": rows}))
        return 0
    print(f"\n{args.model}: calibration {args.nsamples} x {args.seqlen} Lee tokens; perplexity on "
          f"{held_out.shape[1]} held-out Lee tokens (windows of {args.seqlen}); device {args.device}")
    print(f"{'method':<11}{'pattern':>8}{'sparsity':>10}{'perplexity':>12}{'prune s':>9}")
    for row in rows:
        print(f"{row['method']:<11}{row['pattern']:>8}{row['sparsity']:>10.2%}{row['perplexity']:>12.2f}"
              f"{row['time_s']:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
