"""Peak host memory and time of `sparsekern prune` vs depth: streamed (default) vs in memory (--no-stream).

Random Llama checkpoints of one width and 4/16/64 decoder layers (fp32), each pruned with Wanda 50% on a few
calibration windows in its own subprocess; the peak resident size is the child's VmHWM (getrusage's ru_maxrss
would start from this parent's size at fork). Rows go to results/scale.csv.

    python benchmarks/bench_scale.py --hidden 256 --intermediate 1024 --layers 4,16,64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows  # noqa: E402

CHILD = """
import json, os, sys, time
from sparsekern.cli import main
source, out, calib, stream, nsamples, seqlen = sys.argv[1:]
start = time.perf_counter()
code = main(["prune", source, "--method", "wanda", "--nsamples", nsamples, "--seqlen", seqlen, "--calib", calib,
             "--device", "cpu", "--quiet", "--no-resume", "--out", out] + ([] if stream == "1" else ["--no-stream"]))
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"code": code, "peak_rss_mib": hwm / 1024, "time_s": time.perf_counter() - start}))
"""


def write_model(folder: Path, hidden: int, intermediate: int, layers: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsekern.models import parameters_on_meta

    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=4096)
    with parameters_on_meta():
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(t.shape, generator=generator) * 0.02 for name, t in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model.save_pretrained(folder, max_shard_size="200MB")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({chr(i): i for i in range(128)} | {"[UNK]": 128}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in state.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--layers", default="4,16,64")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        calib = root / "calib.txt"
        calib.write_text("The quick brown fox jumps over the lazy dog. " * 400)
        for layers in [int(n) for n in args.layers.split(",")]:
            source = root / f"src{layers}"
            weight_bytes = write_model(source, args.hidden, args.intermediate, layers)
            for stream in (True, False):
                out = root / f"out{layers}-{int(stream)}"
                done = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out), str(calib), str(int(stream)),
                                       str(args.nsamples), str(args.seqlen)], capture_output=True, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-3000:])
                result = json.loads(done.stdout.strip().splitlines()[-1])
                row = {"bench": "scale", "path": "streamed" if stream else "in_memory", "layers": layers,
                       "hidden": args.hidden, "intermediate": args.intermediate, "dtype": "float32",
                       "weights_mib": round(weight_bytes / 2**20, 1), "nsamples": args.nsamples,
                       "seqlen": args.seqlen, "peak_rss_mib": round(result["peak_rss_mib"], 1),
                       "time_s": round(result["time_s"], 2)}
                print(row, flush=True)
                rows.append(row)
    print(append_rows("scale", rows, torch.device("cpu")))


if __name__ == "__main__":
    main()
