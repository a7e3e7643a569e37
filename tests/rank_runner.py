"""One rank of a distributed ``sparsekern prune`` for tests/test_distributed.py (RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT come from the environment, as torchrun sets them).

    python tests/rank_runner.py PRUNE_ARGS...                  # a plain rank
    python tests/rank_runner.py --kill-at PREFIX PRUNE_ARGS...  # SIGKILL this process as it starts pruning the
                                                                # first linear whose name starts with PREFIX
    python tests/rank_runner.py --hang-at PREFIX PRUNE_ARGS...  # sleep there for an hour instead
    python tests/rank_runner.py --api OUT SOURCE CALIB METHOD   # sparsekern.prune on the model in memory, inside
                                                                # a Gloo group this script joins; OUT.RANK.safetensors
"""

import os
import signal
import sys
import time


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["--api"]:
        return _api(*argv[1:])
    if argv[:1] in (["--kill-at"], ["--hang-at"]):
        hang, prefix, argv = argv[0] == "--hang-at", argv[1], argv[2:]
        from sparsekern import pipeline

        original = pipeline._prune_linear

        def stopped(method, linear, prepared, pattern, where, *args):
            if where.startswith(prefix):  # mid-layer: the other ranks wait for this one's weights
                if hang:
                    time.sleep(3600)
                os.kill(os.getpid(), signal.SIGKILL)
            return original(method, linear, prepared, pattern, where, *args)

        pipeline._prune_linear = stopped
    from sparsekern.cli import main as cli

    return cli(["prune", *argv])


def _api(out: str, source: str, calib: str, method: str) -> int:
    import torch.distributed as dist
    from safetensors.torch import save_file

    import sparsekern
    from sparsekern.models import load_model

    dist.init_process_group("gloo")
    model, tokenizer = load_model(source, dtype="float32")
    sparsekern.prune(model, tokenizer, method=method, calib=calib, nsamples=4, seqlen=16, batch_size=2,
                     progress=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}.{dist.get_rank()}.safetensors")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
