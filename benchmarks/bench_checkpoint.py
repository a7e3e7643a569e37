"""Compressed checkpoints: size on disk and load time, dense vs compressed, for magnitude-pruned models.

    python benchmarks/bench_checkpoint.py                                  # SmolLM2-135M and a 7B-shaped Llama
    python benchmarks/bench_checkpoint.py --models smollm2 --patterns 0.5,0.7,2:4
    python benchmarks/bench_checkpoint.py --models llama7b --layers 2      # a CPU-sized 7B-shaped model
    python benchmarks/bench_checkpoint.py --models tiny --repeat 1 --no-save    # a smoke run

Models: ``smollm2`` (SmolLM2-135M, the cached folder of ``sparsekern.models.resolve_model("smollm2-135m")``;
skipped with a message where it is unavailable), ``llama7b`` (a random Llama with LLaMA-7B's shapes and
``--layers`` decoder layers: 32, the real model, by default on a GPU machine, 2 otherwise), ``tiny`` (a random
2-layer Llama of width 64, for tests). Each is cast to ``--dtype`` (default float16, the deployment dtype), and for
each pattern of ``--patterns`` (default 0.5, 0.7, 2:4) its decoder linears are pruned by magnitude per row
(``sparsekern.bench.prune_by_magnitude``: no calibration, quick; sizes do not depend on which weights are kept)
and saved with ``sparsekern.checkpoint.save_compressed`` (each linear in the smallest format: the bitmap for
unstructured, 2:4 for 2:4 weights). The dense model (the same weights, unpruned) is saved once with
``save_pretrained``: pruning does not change its size.

Rows (results/checkpoint.csv): the checkpoint's linear bytes as ``save_compressed`` reports them
(``dense_linear_bytes``, ``stored_linear_bytes``, ``ratio``; every ``nn.Linear`` but one tied to the embeddings,
so a dense untied lm_head counts on both sides) and over the compressed linears only (``pruned_dense_bytes``,
``pruned_stored_bytes``, ``pruned_ratio``: what the format saves on the layers it stores), the weight files
(``dense_file_bytes``, ``compressed_file_bytes``, ``file_ratio``), and load times to ``--device``, medians of
``--repeat`` after a warm-up (so the files are in the page cache): ``compressed_load_ms`` (``sparsekern.load`` of
the compressed folder) and ``dense_load_ms`` (``AutoModelForCausalLM.from_pretrained`` of the dense one, plus its
tokenizer as ``sparsekern.load`` loads one too), each until every page of the model's tensors has been read once
(``from_pretrained`` maps the safetensors file and reads it lazily); ``speedup`` = dense load time / compressed
load time (baseline "dense").
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune_model import CONFIGS  # noqa: E402
from common import append_rows, measure  # noqa: E402

MODELS = ("smollm2", "llama7b", "tiny")


def char_tokenizer():
    """A small Hugging Face fast tokenizer built offline (a token per ASCII character), saved beside the random
    models: ``sparsekern.load`` loads a tokenizer with the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(128)}
    vocab["[UNK]"] = 128
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def model_source(name: str, layers: int):
    """(label, build) where build() returns a fresh dense (model, tokenizer) in float32, or None with a message
    when the model is unavailable here."""
    if name == "smollm2":
        from sparsekern.models import ModelPackageMissing, load_model, resolve_model

        try:
            folder = resolve_model("smollm2-135m")
        except (ModelPackageMissing, ImportError, OSError, ValueError) as exc:
            print(f"smollm2: skipped, SmolLM2-135M is unavailable here ({str(exc).splitlines()[0]})")
            return None
        return "smollm2-135m", lambda: load_model(folder)

    def build():
        from transformers import AutoModelForCausalLM, LlamaConfig

        options = dict(CONFIGS["7b" if name == "llama7b" else "tiny"])
        options["num_hidden_layers"] = layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**options, max_position_embeddings=4096))
        return model.eval(), char_tokenizer()

    return (f"llama-7b-shape-{layers}l" if name == "llama7b" else "tiny-llama"), build


def pruned_bytes(model) -> tuple[int, int]:
    """(dense bytes, stored bytes) of the model's compressed linears only."""
    from sparsekern.nn import SparseLinear

    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    return (sum(m.in_features * m.out_features * m.values.element_size() for m in layers),
            sum(m.weight_nbytes() for m in layers))


def touch(model):
    """Read a byte of every 4 KiB page of every tensor of the model: a load that maps the file (safetensors' mmap)
    has then read it, as one that copies it has; both are timed to this point."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.numel():
                flat = tensor.detach().reshape(-1).view(torch.uint8)
                int(flat[::4096].sum())
    return model


def bench_model(name: str, args, work: Path, device: torch.device) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sparsekern
    from sparsekern import checkpoint
    from sparsekern.bench import prune_by_magnitude
    from sparsekern.models import save_checkpoint

    layers = args.layers if name != "tiny" else 2
    source = model_source(name, layers)
    if source is None:
        return []
    label, build = source
    dtype = getattr(torch, args.dtype)

    def fresh():
        model, tokenizer = build()
        return model.to(dtype), tokenizer

    model, tokenizer = fresh()
    model_layers = model.config.num_hidden_layers
    dense_dir = work / f"{name}-dense"
    save_checkpoint(model, tokenizer, dense_dir)
    del model
    gc.collect()
    dense_file = checkpoint.folder_bytes(dense_dir)["weights"]

    def load_dense():
        loaded = AutoModelForCausalLM.from_pretrained(dense_dir, dtype="auto").to(device).eval()
        AutoTokenizer.from_pretrained(dense_dir)
        return touch(loaded)

    def load_compressed(folder):
        return touch(sparsekern.load(folder, device=device)[0])

    dense_load = measure(load_dense, device, repeat=args.repeat)["median_ms"]
    print(f"{label}: dense checkpoint {dense_file / 2**20:.1f} MiB, loads in {dense_load:.0f} ms", flush=True)
    rows = []
    for pattern in args.patterns.split(","):
        model, tokenizer = fresh()
        prune_by_magnitude(model, pattern)
        out = work / f"{name}-{pattern.replace(':', 'of')}"
        sizes = checkpoint.save_compressed(model, tokenizer, out)
        pruned_dense, pruned_stored = pruned_bytes(model)
        del model
        gc.collect()
        compressed_load = measure(lambda: load_compressed(out), device, repeat=args.repeat)["median_ms"]
        row = {"model": label, "layers": model_layers, "dtype": args.dtype, "pattern": pattern,
               "formats": " ".join(f"{fmt}:{n}" for fmt, n in sorted(sizes["compressed_linears"].items())),
               "dense_linear_bytes": sizes["dense_linear_bytes"], "stored_linear_bytes": sizes["stored_linear_bytes"],
               "ratio": sizes["ratio"], "pruned_dense_bytes": pruned_dense, "pruned_stored_bytes": pruned_stored,
               "pruned_ratio": pruned_stored / pruned_dense if pruned_dense else 1.0,
               "dense_file_bytes": dense_file, "compressed_file_bytes": sizes["file_bytes"]["weights"],
               "file_ratio": sizes["file_bytes"]["weights"] / dense_file, "dense_load_ms": dense_load,
               "compressed_load_ms": compressed_load, "repeat": args.repeat, "baseline": "dense",
               "speedup": dense_load / compressed_load}
        rows.append(row)
        print(f"{label} {pattern:<4} ({row['formats']}): linears {row['ratio']:.1%} of dense "
              f"({row['pruned_ratio']:.1%} over the compressed ones), weight file {row['file_ratio']:.1%} "
              f"({row['compressed_file_bytes'] / 2**20:.1f} MiB), loads in {compressed_load:.0f} ms "
              f"(x{row['speedup']:.2f} vs dense)", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(dense_dir, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,llama7b", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--patterns", default="0.5,0.7,2:4",
                        help="comma-separated: unstructured sparsities (stored as bitmaps) or N:M such as 2:4")
    parser.add_argument("--layers", type=int, default=32 if torch.cuda.is_available() else 2,
                        help="decoder layers of the 7B-shaped model (default: 32 on a GPU machine, else 2)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--device", default="cpu", help="where the loads put the model")
    parser.add_argument("--repeat", type=int, default=3, help="timed loads (after one warm-up)")
    parser.add_argument("--workdir", default=None, help="where the checkpoints are written (default: a temporary "
                                                        "folder; each is deleted once measured)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose among {', '.join(MODELS)}")
    for pattern in args.patterns.split(","):
        try:
            ok = (lambda n, m: 0 < n < m)(*map(int, pattern.split(":"))) if ":" in pattern else 0 < float(pattern) < 1
        except ValueError:
            ok = False
        if not ok:
            parser.error(f"bad pattern {pattern!r}: an unstructured sparsity in (0, 1) or N:M such as 2:4")
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="sparsekern-bench-checkpoint-", dir=args.workdir))
    try:
        rows = [row for name in names for row in bench_model(name, args, work, device)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if rows and not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('checkpoint', rows, device)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
