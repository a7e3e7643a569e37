"""Peak host memory and time of `sparsekern prune` vs depth: streamed (default) vs in memory (--no-stream); and wall
time and bytes communicated per layer vs the number of ranks of a distributed run (--ranks).

Random Llama checkpoints of one width and 4/16/64 decoder layers (fp32), each pruned with Wanda 50% on a few
calibration windows in its own subprocess; the peak resident size is the child's VmHWM (getrusage's ru_maxrss
would start from this parent's size at fork). With --ranks, one checkpoint (the first --layers) is pruned with
--method (default sparsegpt) by 1, 2, ... ranks started as torchrun would start them (Gloo on the CPU, one thread
per rank; NCCL with --device cuda, one GPU per rank); the time is rank 0's pruning time (the report's time_s: no
process start-up), the bytes are the payloads of every rank's collectives. Rows go to results/scale.csv.

    python benchmarks/bench_scale.py --hidden 256 --intermediate 1024 --layers 4,16,64
    python benchmarks/bench_scale.py --hidden 512 --intermediate 1408 --layers 8 --ranks 1,2 --nsamples 16
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


RANK_CHILD = """
import json, sys
from sparsekern.cli import main
source, out, calib, method, device, nsamples, seqlen = sys.argv[1:]
main(["prune", source, "--method", method, "--nsamples", nsamples, "--seqlen", seqlen, "--calib", calib,
      "--batch-size", "1", "--device", device, "--quiet", "--no-resume", "--json", "--out", out])
"""


def run_ranks(source: Path, out: Path, calib: Path, world: int, method: str, device: str, nsamples: int,
              seqlen: int) -> list[dict]:
    """Every rank's JSON summary of one `sparsekern prune` over ``world`` ranks (one process: world 1)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_CHILD, str(source), str(out), str(calib), method,
                                       device, str(nsamples), str(seqlen)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("\n".join(err[-2000:] for _, err in outputs))
    return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--layers", default="4,16,64")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--ranks", default=None, help="comma-separated rank counts, e.g. 1,2,4: the distributed rows")
    parser.add_argument("--method", default="sparsegpt", help="--ranks: the pruning method (default sparsegpt)")
    parser.add_argument("--device", default="cpu", help="--ranks: cpu (Gloo) or cuda (NCCL, one GPU per rank)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        calib = root / "calib.txt"
        calib.write_text("The quick brown fox jumps over the lazy dog. " * 400)
        if args.ranks:
            layers = int(args.layers.split(",")[0])
            source = root / "src"
            weight_bytes = write_model(source, args.hidden, args.intermediate, layers)
            for world in [int(n) for n in args.ranks.split(",")]:
                summaries = run_ranks(source, root / f"out-ranks{world}", calib, world, args.method, args.device,
                                      args.nsamples, args.seqlen)
                moved = sum(s.get("bytes_moved", 0) for s in summaries)
                row = {"bench": "scale_ranks", "path": "streamed", "layers": layers, "hidden": args.hidden,
                       "intermediate": args.intermediate, "dtype": "float32",
                       "weights_mib": round(weight_bytes / 2**20, 1), "nsamples": args.nsamples,
                       "seqlen": args.seqlen, "method": args.method, "ranks": world,
                       "backend": "single process" if world == 1 else "nccl" if args.device == "cuda" else "gloo",
                       "time_s": round(summaries[0]["time_s"], 2),
                       "mib_moved_per_layer": round(moved / layers / 2**20, 3)}
                print(row, flush=True)
                rows.append(row)
            print(append_rows("scale", rows, torch.device(args.device)))
            return
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
