"""``sparsekern prune|eval|generate|bench``: prune a Hugging Face causal LM, measure it, sample from it, and time
its 2:4 layers on this GPU."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from .distributed import RankFailure, joined_process_group
from .prune import REGISTRY, option_specs
from .reference import NotPositiveDefiniteError

# Errors a user causes (bad arguments, missing files, unusable data): one clear line, no traceback.
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError, MemoryError, NotPositiveDefiniteError)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="dtype to load the model in (default: the checkpoint's)")
    parser.add_argument("--device", default="auto",
                        help="where to compute: cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_bos_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bos", default="auto", choices=["auto", "always", "never"],
                        help="start every window with the BOS token: auto (default) when the tokenizer adds one "
                             "(Gemma, Llama...), always, or never (the published wikitext2 protocol: windows cut "
                             "from the middle of the stream)")


def _add_step_options(parser: argparse.ArgumentParser) -> None:
    """One flag per option the registered steps declare (``sparsekern.prune.registry``); default None: the step's
    own default. Which steps take it is in its help."""
    group = parser.add_argument_group("options of the methods, updates and refinements")
    for spec in option_specs().values():
        takers = ", ".join(f"{taker} ({default})" for taker, default in spec.takers.items())
        kwargs = {"action": "store_true", "default": None} if spec.type is bool else {"type": spec.type}
        if spec.choices is not None:
            kwargs["choices"] = [c for c in spec.choices if c is not None]
        group.add_argument(spec.flag, dest=spec.name, metavar=None if spec.choices or spec.type is bool else
                           spec.type.__name__.upper(), help=f"{spec.help}. For: {takers}", **kwargs)


def _step_options(args) -> dict:
    return {name: getattr(args, name) for name in option_specs()}


class _Parser(argparse.ArgumentParser):
    """A bad argument gets one line naming it, like every other user error (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsekern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model one layer at a time and save a Hugging Face checkpoint")
    prune.add_argument("model", help="a local Hugging Face folder, or an alias such as smollm2-135m")
    prune.add_argument("--method", default="admm", choices=sorted(REGISTRY["method"]),
                       help="admm (default: the layer's sparse regression by ADMM, then an exact refit; the lowest "
                            "perplexity measured at every pattern, about 2.5x SparseGPT's time on a CPU), sparsegpt "
                            "(the published algorithm; the one with --wbits), wanda, ria, magnitude, "
                            "or obc: exact greedy OBS per row, a quality ceiling for SparseGPT that costs "
                            "O(rows * k * n^2) per linear (k pruned of n inputs): for small models only")
    prune.add_argument("--update", default="none", choices=["none", *sorted(REGISTRY["update"])],
                       help="obs: reconstruct the kept weights on the method's mask with SparseGPT's OBS sweep (for "
                            "wanda, ria, magnitude); lsq: refit them exactly by least squares on the final mask "
                            "(conjugate gradients; after any method, SparseGPT included); none (default)")
    prune.add_argument("--refine", default="none", choices=["none", *sorted(REGISTRY["refine"])],
                       help="improve each linear's mask after the method (and update), keeping its pattern: dsnot "
                            "(training-free prune-and-grow swaps), or none (default)")
    prune.add_argument("--permute", action="store_true",
                       help="N:M patterns: prune each input group in the channel order that keeps the most Wanda "
                            "score (the checkpoint keeps its own order; the orders go to permutations.safetensors)")
    prune.add_argument("--allocation", default="uniform", metavar="{uniform,owl,sensitivity,FILE.json}",
                       help="spread an unstructured --sparsity over the decoder layers: uniform (default), owl "
                            "(layers with more activation outliers pruned less), sensitivity (a depth schedule "
                            "fitted on the calibration loss), or a JSON file {layer index: sparsity}; the average "
                            "over the pruned parameters stays the target")
    prune.add_argument("--sparsity", default="0.5", help="a ratio such as 0.5, or N:M such as 2:4 (default 0.5)")
    prune.add_argument("--calib", default="lee",
                       help="calibration text: lee (built in), wikitext2, c4, ptb, or a .txt/.jsonl path")
    prune.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    prune.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    prune.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows")
    _add_bos_arg(prune)
    _add_step_options(prune)
    prune.add_argument("--true-sequential", action="store_true",
                       help="prune each layer's input groups in order, re-collecting statistics in between")
    prune.add_argument("--override", action="append", default=[], metavar="GLOB=PATTERN",
                       help="per-layer pattern, e.g. '*.down_proj=0.6' or '*.layers.0.*=dense' (repeatable)")
    prune.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    prune.add_argument("--out", required=True, help="folder for the pruned checkpoint (written atomically)")
    prune.add_argument("--save-format", default="dense", choices=["dense", "compressed"],
                       help="dense (default): a plain Hugging Face checkpoint; compressed: each pruned linear stored "
                            "in its sparse format (2:4 or bitmap), smaller on disk, loaded by sparsekern.load and "
                            "this CLI's eval/generate (sparsekern decompress turns it back into the dense one)")
    prune.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    prune.add_argument("--restart", action="store_true",
                       help="discard the progress an interrupted run left in OUT.partial instead of resuming")
    prune.add_argument("--no-resume", action="store_true",
                       help="record no progress (no OUT.partial): nothing to resume from if the run dies")
    prune.add_argument("--no-stream", action="store_true",
                       help="load the whole model in memory; by default a safetensors checkpoint is streamed: one "
                            "decoder layer in memory at a time, written out once pruned (--save-format compressed "
                            "always loads the whole model; --allocation owl and sensitivity need this flag)")
    prune.add_argument("--offload-activations", default=None, metavar="DIR",
                       help="keep the calibration activations in a temporary folder under DIR between layers, one "
                            "batch in memory at a time (for the widest models; slower by the disk's speed)")
    prune.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                       help="under torchrun: how long a rank waits for the others at each exchange before the job "
                            "stops, naming the rank that hung (default 1800)")
    _add_model_args(prune)

    evaluate = sub.add_parser("eval", help="perplexity over non-overlapping windows of held-out text, or zero-shot "
                                           "task accuracy with lm-evaluation-harness (--tasks)")
    evaluate.add_argument("model", help="a pruned checkpoint folder, any Hugging Face folder, or an alias")
    evaluate.add_argument("--data", default="lee", help="lee (its held-out split), wikitext2, c4, ptb, or a path")
    evaluate.add_argument("--split", default="test", choices=["train", "test"])
    evaluate.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    evaluate.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
    evaluate.add_argument("--batch-size", type=int, default=8, help="windows (or task requests) per forward pass")
    evaluate.add_argument("--tasks", default=None,
                          help="instead of perplexity, zero-shot accuracy (lm-evaluation-harness, pip install "
                               "'sparsekern[tasks]'): comma-separated lm-eval task names (the papers': piqa,arc_easy,"
                               "arc_challenge,hellaswag,winogrande,boolq,rte,openbookqa; their datasets come from the "
                               "Hugging Face hub), task YAML files, or folders of them; a YAML with dataset_path: json "
                               "and dataset_kwargs: {data_files: FILE} runs on local JSON/JSONL. --bos never tokenizes "
                               "the requests without the tokenizer's special tokens")
    evaluate.add_argument("--limit", type=int, default=None,
                          help="with --tasks: score only the first N documents of each task (a quick look)")
    _add_bos_arg(evaluate)
    _add_model_args(evaluate)

    generate = sub.add_parser("generate", help="sample text from a (pruned) model")
    generate.add_argument("model", help="a pruned checkpoint folder, any Hugging Face folder, or an alias")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=0.9)
    generate.add_argument("--seed", type=int, default=0)
    _add_model_args(generate)

    compress = sub.add_parser("compress", help="store a pruned (dense) checkpoint's linears compressed: 2:4 or "
                                               "bitmap per layer, smaller on disk")
    compress.add_argument("model", help="a pruned checkpoint folder (or any Hugging Face folder)")
    compress.add_argument("--out", required=True, help="folder for the compressed checkpoint (written atomically)")
    compress.add_argument("--format", default="auto", choices=["auto", "2:4", "bitmap"],
                          help="auto (default): 2:4 where a linear is 2:4, else the bitmap where that saves at least "
                               "25%% of its bytes, else dense; or one format only")
    compress.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    compress.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")

    decompress = sub.add_parser("decompress", help="turn a compressed checkpoint back into the plain Hugging Face "
                                                   "one, bit-identical to the dense save")
    decompress.add_argument("model", help="a compressed checkpoint folder (with sparsekern.json)")
    decompress.add_argument("--out", required=True, help="folder for the dense checkpoint (written atomically)")
    decompress.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    decompress.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")

    bench = sub.add_parser("bench", help="time compressed linear layers vs dense on this GPU (and tune SparseLinear)")
    bench.add_argument("--shapes", default="7b", help="comma-separated LLaMA shape sets: 7b, 13b, 70b (default 7b)")
    bench.add_argument("--m", default=None, help="comma-separated batch sizes (default 1,2,4,...,8192)")
    bench.add_argument("--dtypes", default="float16", help="comma-separated: float16, bfloat16")
    bench.add_argument("--formats", default="2:4,bitmap", help="comma-separated: 2:4, bitmap (default both)")
    bench.add_argument("--sparsities", default="0.5,0.6,0.7,0.8",
                       help="comma-separated sparsities of the bitmap layers timed (default 0.5,0.6,0.7,0.8)")
    bench.add_argument("--write-table", action="store_true",
                       help="store the measured crossovers in this user's dispatch table (in the cache folder, "
                            "$SPARSEKERN_CACHE or ~/.cache/sparsekern), which SparseLinear reads")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of progress lines")
    return parser


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: not a device sparsekern runs on; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return device


def _parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        glob, sep, pattern = item.partition("=")
        if not sep or not glob or not pattern:
            raise ValueError(f"--override {item!r}: write GLOB=PATTERN, e.g. '*.down_proj=0.6' or '*.layers.0.*=dense'")
        overrides[glob] = pattern
    return overrides


def cmd_prune(args) -> dict:
    from .api import check_arguments
    from .models import OutputLock, check_destination, resolve_model

    # Everything the arguments alone show to be wrong fails here, before the model is loaded and hours of work.
    overrides = _parse_overrides(args.override)
    device = _device(args.device)
    check_arguments(method=args.method, sparsity=args.sparsity, calib=args.calib, nsamples=args.nsamples,
                    seqlen=args.seqlen, seed=args.seed, bos=args.bos, batch_size=args.batch_size,
                    true_sequential=args.true_sequential, progress=not args.quiet, update=args.update,
                    refine=args.refine, allocation=args.allocation, permute=args.permute,
                    offload_activations=args.offload_activations, **_step_options(args))
    out = Path(args.out)
    source = resolve_model(args.model)
    # Under torchrun (WORLD_SIZE > 1): join the process group; rank 0 checks and locks --out and writes it.
    with joined_process_group(device, args.dist_timeout) as (device, ranks):
        writer = ranks is None or ranks.is_writer
        if writer:
            check_destination(out, args.overwrite, source)
        with OutputLock(out) if writer else contextlib.nullcontext():  # a second run on the same --out is refused
            result = _prune_into(args, out, source, overrides, device, writer)
        if ranks is not None:  # every rank ends when the checkpoint is in place (or with rank 0's error)
            ranks.barrier("rank 0 writing the checkpoint")
            result.update(rank=ranks.rank, world_size=ranks.world, bytes_moved=ranks.bytes_moved)
        return result


def _prune_into(args, out: Path, source: Path, overrides: dict, device: torch.device, writer: bool = True) -> dict:
    from .api import prune
    from .models import load_model, partial_dir, save_checkpoint
    from .streaming import is_streamable, prune_checkpoint

    # Each finished layer is recorded here, so an interrupted run resumes; removed once the checkpoint is saved.
    partial = partial_dir(out)
    if args.restart and writer:
        shutil.rmtree(partial, ignore_errors=True)
    options = dict(method=args.method, sparsity=args.sparsity, calib=args.calib, nsamples=args.nsamples,
                   seqlen=args.seqlen, seed=args.seed, bos=args.bos, update=args.update, refine=args.refine,
                   allocation=args.allocation, permute=args.permute, device=device,
                   offload_activations=args.offload_activations,
                   true_sequential=args.true_sequential, overrides=overrides, batch_size=args.batch_size,
                   progress=not args.quiet, **_step_options(args))
    resume_dir = None if args.no_resume else str(partial)
    # --save-format compressed goes through the in-memory path for now: save_compressed takes the whole model.
    # (--allocation owl/sensitivity, which need dense passes over every layer first, are refused when streamed,
    # with a message that says --no-stream: api.check_streamable.)
    stream = not args.no_stream and args.save_format == "dense" and is_streamable(source)
    sizes = None
    if stream:  # one decoder layer in memory at a time, written out as the output's shards
        report = prune_checkpoint(source, out, dtype=args.dtype, overwrite=args.overwrite, resume_dir=resume_dir,
                                  record={"model": str(args.model)}, **options)
    else:
        model, tokenizer = load_model(source, dtype=args.dtype)  # stays on the CPU: layers visit the device
        report = prune(model, tokenizer, resume_dir=resume_dir, **options)
        record = {"model": str(args.model), **report.to_dict()}
        if not writer:
            pass
        elif args.save_format == "compressed":
            from .checkpoint import save_compressed

            sizes = save_compressed(model, tokenizer, out, {"sparsity.json": record}, overwrite=args.overwrite,
                                    perms=report.permutations)
        else:
            save_checkpoint(model, tokenizer, out, {"sparsity.json": record}, overwrite=args.overwrite,
                            extra_tensors={"permutations.safetensors": report.permutations} if report.permutations
                            else None)
    if not writer:  # rank > 0 of a distributed run: rank 0 reports
        return {"method": report.method, "pattern": report.pattern, "out": str(out), "written_by": "rank 0"}
    shutil.rmtree(partial, ignore_errors=True)
    result = {"method": report.method, "pattern": report.pattern, "sparsity": report.sparsity,
              "time_s": report.time_s, "out": str(out), "linears": len(report.linears),
              "save_format": args.save_format, "streamed": stream, **({"sizes": sizes} if sizes else {})}
    if not args.json:
        _print_prune_table(report)
        print(f"\n{report.method} {report.pattern}: {report.sparsity:.2%} zeros over {len(report.linears)} linears "
              f"in {report.time_s:.1f} s -> {out}")
        if sizes:
            print(_sizes_line(sizes))
    return result


def _sizes_line(sizes: dict) -> str:
    per_format = ", ".join(f"{count} {fmt}" for fmt, count in sizes["compressed_linears"].items()) or "none"
    return (f"compressed linears: {per_format}; linear weights {sizes['stored_linear_bytes'] / 2**20:.1f} MiB stored "
            f"of {sizes['dense_linear_bytes'] / 2**20:.1f} MiB dense ({sizes['ratio']:.1%}); weight files "
            f"{sizes['file_bytes']['weights'] / 2**20:.1f} MiB")


def _print_prune_table(report) -> None:
    """One row per decoder layer: its linears' achieved sparsity, the method's loss and time in the method."""
    from .api import zero_fraction

    rows: dict[str, list] = {}
    for linear in report.linears:
        parts = linear.name.split(".")  # e.g. model.layers.3.self_attn.q_proj -> model.layers.3
        layer = ".".join(next((parts[: i + 1] for i, p in enumerate(parts) if p.isdigit()), parts[:1]))
        rows.setdefault(layer, []).append(linear)
    print(f"{'layer':<28}{'linears':>8}{'sparsity':>10}{'loss':>12}{'method s':>9}")
    for layer, linears in rows.items():
        sparsity = zero_fraction(linears)
        losses = [l.loss for l in linears if l.loss is not None]
        loss = f"{sum(losses):.4g}" if losses else "-"
        print(f"{layer:<28}{len(linears):>8}{sparsity:>10.2%}{loss:>12}{sum(l.time_s for l in linears):>9.2f}")


def cmd_eval(args) -> dict:
    from .data import check_source, eval_tokens, window_bos
    from .eval import perplexity

    if args.seqlen < 2 or args.batch_size < 1 or (args.max_windows is not None and args.max_windows < 1):
        raise ValueError(f"--seqlen must be at least 2 and --batch-size, --max-windows positive; got --seqlen "
                         f"{args.seqlen}, --batch-size {args.batch_size}, --max-windows {args.max_windows}")
    if args.tasks is not None:
        from .tasks import format_table, load_tasks, zero_shot

        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be a positive number of documents per task, got {args.limit}")
        device = _device(args.device)
        task_set = load_tasks(args.tasks, progress=not args.quiet)  # a bad task fails before the model loads
        model, tokenizer = _load_any(args.model, args.dtype, device)
        result = zero_shot(model, tokenizer, task_set, limit=args.limit, batch_size=args.batch_size,
                           add_bos_token={"auto": None, "always": True, "never": False}[args.bos],
                           progress=not args.quiet)
        result = {"model": str(args.model), **result}
        if not args.json:
            print(format_table(result))
            print(f"\n{args.model}: {len(result['tasks'])} task(s) in {result['time_s']:.1f} s"
                  f"{f' (first {args.limit} documents of each)' if args.limit else ''}")
        return result
    if args.limit is not None:
        raise ValueError("--limit applies to --tasks; for perplexity, --max-windows caps the windows scored")
    check_source(args.data)
    device = _device(args.device)
    model, tokenizer = _load_any(args.model, args.dtype, device)
    bos_id = window_bos(tokenizer, args.bos)
    ids = eval_tokens(tokenizer, args.data, args.split, args.bos)
    start = time.perf_counter()
    result = perplexity(model, ids, seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.max_windows,
                        progress=not args.quiet, bos_token_id=bos_id)
    result = {"model": str(args.model), "data": args.data, "split": args.split, "seqlen": args.seqlen,
              "bos_token_id": bos_id, **result, "time_s": time.perf_counter() - start}
    if not args.json:
        print(f"{args.model}: perplexity {result['perplexity']:.3f} on {result['tokens']} tokens of "
              f"{args.data}/{args.split} (seqlen {args.seqlen}{', BOS-led windows' if bos_id is not None else ''})")
    return result


def _load_any(name: str, dtype: str, device: torch.device):
    """A compressed checkpoint through ``sparsekern.load`` (SparseLinear layers), anything else as it is."""
    from .checkpoint import is_compressed, load
    from .models import load_model, resolve_model

    folder = resolve_model(name)
    if is_compressed(folder):
        return load(folder, device=device, dtype=dtype)
    return load_model(folder, dtype=dtype, device=device)


def cmd_compress(args) -> dict:
    from .checkpoint import compress_checkpoint

    sizes = compress_checkpoint(args.model, args.out, overwrite=args.overwrite, format=args.format)
    if not args.json:
        print(f"{args.model} -> {sizes['out']}")
        print(_sizes_line(sizes))
    return sizes


def cmd_decompress(args) -> dict:
    from .checkpoint import decompress_checkpoint, folder_bytes

    out = decompress_checkpoint(args.model, args.out, overwrite=args.overwrite)
    result = {"out": str(out), "file_bytes": folder_bytes(out)}
    if not args.json:
        print(f"{args.model} -> {out} (weight files {result['file_bytes']['weights'] / 2**20:.1f} MiB)")
    return result


def cmd_generate(args) -> dict:
    if not args.prompt.strip():
        raise ValueError("--prompt is empty: give the text to continue, e.g. --prompt 'The prime minister said'")
    device = _device(args.device)
    model, tokenizer = _load_any(args.model, args.dtype, device)
    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} \
        if args.temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
    text = tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    if not args.json:
        print(args.prompt + text)
    return {"prompt": args.prompt, "completion": text}


def cmd_bench(args) -> dict:
    if not torch.cuda.is_available():
        raise ValueError("bench times GPU kernels and this machine has no CUDA GPU")
    from . import bench

    try:
        shapes = [shape for name in args.shapes.split(",") for shape in bench.SHAPES[name]]
        m_values = [int(m) for m in args.m.split(",")] if args.m else bench.M_VALUES
        dtypes = [getattr(torch, {"float16": "float16", "bfloat16": "bfloat16"}[d]) for d in args.dtypes.split(",")]
        formats = tuple({"2:4": "2:4", "bitmap": "bitmap"}[f] for f in args.formats.split(","))
        sparsities = tuple(float(s) for s in args.sparsities.split(","))
        if not all(0 < s < 1 for s in sparsities):
            raise ValueError(f"sparsities must lie in (0, 1), got {args.sparsities}")
    except (KeyError, ValueError) as exc:
        raise ValueError(f"bad --shapes/--m/--dtypes/--formats/--sparsities value: {exc}") from None
    rows = bench.run_gemm(shapes, m_values, dtypes, torch.device("cuda"),
                          progress=(lambda line: None) if args.json else print, formats=formats,
                          sparsities=sparsities)
    entries = bench.crossover_rules(rows)
    result = {"rows": rows, "dispatch": entries}
    if args.write_table:
        result["table"] = str(bench.write_table(entries))
        if not args.json:
            print(f"wrote {len(entries)} dispatch entries to {result['table']}")
    return result


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """--quiet silences transformers' own progress bars (loading and writing weights) too, for this command."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "generate": cmd_generate, "compress": cmd_compress,
            "decompress": cmd_decompress, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _quiet_transformers(getattr(args, "quiet", False)):
            result = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        from .models import partial_dir

        from .resume import completed_in

        layers = completed_in(partial_dir(args.out)) if args.command == "prune" else None
        if layers:
            print(f"sparsekern prune: interrupted after layer {layers - 1}; rerun the same command to resume "
                  f"(finished layers are kept in {partial_dir(args.out)})", file=sys.stderr)
        else:
            print(f"sparsekern {args.command}: interrupted", file=sys.stderr)
        return 130
    except RankFailure as exc:  # another rank of a distributed run failed: its rank, layer and the fix
        print(f"sparsekern {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        print(f"sparsekern {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
