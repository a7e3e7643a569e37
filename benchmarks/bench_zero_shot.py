"""Zero-shot accuracy beside perplexity: real models pruned the headline ways, scored by lm-evaluation-harness.

    python benchmarks/bench_zero_shot.py                        # both models, dense + the headline configurations
    python benchmarks/bench_zero_shot.py --models smollm2-135m --patterns 0.7 --seeds 0

The papers' tasks (PIQA, ARC, HellaSwag, ...) come from the dataset hub, which our machines cannot reach, so this
benchmark builds its own offline task from the Lee corpus's held-out articles (never the calibration split):
``lee_cloze``, a sentence cloze in the style of the story-cloze tasks. Each item is a sentence of an article and
four candidate next sentences: the one that follows it there and three drawn from other held-out articles; the
model picks the candidate with the highest log-likelihood (``acc``; ``acc_norm``: per byte, as lm-eval
normalizes). The JSONL and its task YAML are written to ``--task-dir`` and run through ``sparsekern.tasks.zero_shot``
(lm-eval's own request building and scoring), exactly as ``sparsekern eval --tasks FILE.yaml`` would. Chance is
25%. Rows go to results/zero_shot.csv with the configuration, seed, accuracy and its standard error, and the
held-out perplexity of the same pruned model; ``--summary`` prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_rows  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.data import calibration_windows, eval_tokens, load_text, window_bos  # noqa: E402
from sparsekern.eval import perplexity  # noqa: E402
from sparsekern.models import cache_dir, load_model  # noqa: E402

CSV = RESULTS / "zero_shot.csv"
TASK = "lee_cloze"
CHOICES = 4
# (pattern, method, update, allocation, permute): dense first, then SparseGPT against its measured best improvements
CONFIGS = [
    ("dense", "-", "-", "-", False),
    ("0.5", "sparsegpt", "none", "uniform", False),
    ("0.5", "sparsegpt", "lsq", "uniform", False),
    ("0.5", "admm", "none", "uniform", False),
    ("0.7", "sparsegpt", "none", "uniform", False),
    ("0.7", "sparsegpt", "none", "sensitivity", False),
    ("0.7", "sparsegpt", "lsq", "sensitivity", False),
    ("0.7", "admm", "none", "uniform", False),
    ("2:4", "sparsegpt", "none", "uniform", False),
    ("2:4", "sparsegpt", "none", "uniform", True),
    ("2:4", "sparsegpt", "lsq", "uniform", True),
    ("2:4", "admm", "none", "uniform", False),
]
TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def sentences(document: str) -> list[str]:
    """A document's sentences: split after . ! ? followed by a space and a capital or a quote."""
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", document.strip())
    return [p.strip() for p in parts if p.strip()]


def cloze_items(documents: list[str], items: int, seed: int = 0, min_words: int = 6, max_words: int = 40
                ) -> list[dict]:
    """Up to ``items`` cloze items: {"context", "choices" (CHOICES sentences), "label" (the true one's index)}.
    Distractors come from other documents, so no item has two plausible true continuations by construction."""
    rng = random.Random(seed)
    per_doc = [[s for s in sentences(doc) if min_words <= len(s.split()) <= max_words] for doc in documents]
    pairs = [(d, a, b) for d, doc in enumerate(per_doc) for a, b in zip(doc, doc[1:])]
    rng.shuffle(pairs)
    out = []
    for d, context, answer in pairs[:items]:
        pool = [s for other, doc in enumerate(per_doc) if other != d for s in doc]
        choices = rng.sample(pool, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices.insert(label, answer)
        out.append({"context": context, "choices": choices, "label": label})
    return out


def write_task(folder: Path, items: int) -> Path:
    """lee_cloze.jsonl and lee_cloze.yaml in ``folder`` (from the held-out split); returns the YAML's path."""
    folder.mkdir(parents=True, exist_ok=True)
    documents = load_text("lee", "test").split("\n\n")
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in cloze_items(documents, items)), encoding="utf-8")
    path = folder / f"{TASK}.yaml"
    path.write_text(TASK_YAML.format(name=TASK, data=data.resolve()), encoding="utf-8")
    return path


def run(args) -> None:
    from sparsekern.tasks import load_tasks, zero_shot

    torch.set_num_threads(args.threads)
    task_set = load_tasks(str(write_task(Path(args.task_dir), args.items)), progress=False)
    patterns = args.patterns.split(",")
    methods = args.methods.split(",") if args.methods else None
    configs = [c for c in CONFIGS if c[0] == "dense" or (c[0] in patterns and (methods is None or c[1] in methods))]
    done = measured() if args.skip_measured else set()
    for model_name in args.models.split(","):
        model, tokenizer = load_model(model_name, dtype="float32")
        dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        bos = window_bos(tokenizer)
        held_out = eval_tokens(tokenizer, "lee", "test")
        for seed in [int(s) for s in args.seeds.split(",")]:
            calib = calibration_windows(tokenizer, "lee", nsamples=args.nsamples, seqlen=args.seqlen, seed=seed)
            for pattern, method, update, allocation, permute in configs:
                if (model_name, pattern, method, update, allocation, permute,
                        None if pattern == "dense" else seed) in done:
                    continue
                if pattern == "dense" and seed != int(args.seeds.split(",")[0]):
                    continue  # no calibration: one row
                model.load_state_dict(dense)
                prune_s = 0.0
                if pattern != "dense":
                    start = time.perf_counter()
                    sparsekern.prune(model, tokenizer, method=method, sparsity=pattern, calib=calib,
                                     update=update, allocation=allocation, permute=permute, progress=False)
                    prune_s = time.perf_counter() - start
                ppl = perplexity(model, held_out, seqlen=args.seqlen, max_windows=args.eval_windows,
                                 progress=False, bos_token_id=bos)["perplexity"]
                scores = zero_shot(model, tokenizer, task_set, batch_size=args.batch_size, progress=False)
                task = scores["tasks"][TASK]
                row = {"model": model_name, "pattern": pattern, "method": method, "update": update,
                       "allocation": allocation,
                       "permute": permute, "seed": seed if pattern != "dense" else "", "nsamples": args.nsamples,
                       "seqlen": args.seqlen, "task": TASK, "items": task["samples"],
                       "acc": round(task["acc"], 4), "acc_stderr": round(task["acc_stderr"], 4),
                       "acc_norm": round(task["acc_norm"], 4), "acc_norm_stderr": round(task["acc_norm_stderr"], 4),
                       "perplexity": round(ppl, 4), "prune_s": round(prune_s, 2), "eval_s": round(scores["time_s"], 1)}
                print(row, flush=True)
                append_rows("zero_shot", [row], torch.device("cpu"))
        model.load_state_dict(dense)
        del model


def _key(row: dict) -> tuple:
    """(model, pattern, method, update, allocation, permute) of a row; rows from before the update column ran none."""
    update = row.get("update") or ("-" if row["pattern"] == "dense" else "none")
    return row["model"], row["pattern"], row["method"], update, row["allocation"], row["permute"] == "True"


def measured(path: Path = CSV) -> set[tuple]:
    """The (configuration, seed) pairs results/zero_shot.csv already has (dense rows: seed None)."""
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        return {(*_key(row), int(row["seed"]) if row["seed"] else None) for row in csv.DictReader(f)}


def summary(path: Path = CSV) -> str:
    """A markdown table: per configuration, mean accuracy over seeds (with the largest standard error of a run) and
    mean perplexity."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        model, pattern, method, update, allocation, permute = _key(row)
        key = (model, pattern, method, update, allocation, "permuted" if permute else "-")
        groups.setdefault(key, []).append(row)
    lines = ["| model | pattern | method | update | allocation | permute | acc (± stderr) | acc_norm | perplexity "
             "| runs |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = {config[0]: i for i, config in enumerate(CONFIGS)}
    for key in sorted(groups, key=lambda k: (k[0], order.get(k[1], 99), k[3], k[4], k[5])):
        runs = groups[key]

        def mean(field):
            return statistics.mean(float(r[field]) for r in runs)

        stderr = max(float(r["acc_stderr"]) for r in runs)
        lines.append(f"| {' | '.join(key)} | {mean('acc'):.3f} ± {stderr:.3f} | {mean('acc_norm'):.3f} "
                     f"| {mean('perplexity'):.2f} | {len(runs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--patterns", default="0.5,0.7,2:4")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--methods", help="only the configurations of these methods (and dense), e.g. admm")
    parser.add_argument("--items", type=int, default=400, help="cloze items at most (the held-out split gives 329)")
    parser.add_argument("--task-dir", default=str(cache_dir() / "tasks"),
                        help="where lee_cloze.jsonl and its YAML are written (default: sparsekern's cache)")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-measured", action="store_true",
                        help="leave out the configurations and seeds results/zero_shot.csv already has")
    parser.add_argument("--summary", action="store_true", help="print the table of results/zero_shot.csv and exit")
    args = parser.parse_args(argv)
    if not args.summary:
        run(args)
    print(summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
