"""Distributed pruning (``sparsekern.distributed``): 2 ranks on Gloo, spawned by the test itself as torchrun would
start them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), give one process's masks and weights; a rank killed
mid-layer ends the job with a message naming it and the layer, and a rerun resumes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checks import tiny_llama_checkpoint
from safetensors.torch import load_file

from sparsekern.distributed import assign_owners, linear_cost, split_batches
from sparsekern.streaming import prune_checkpoint

RUNNER = Path(__file__).with_name("rank_runner.py")
CALIBRATION = ["--nsamples", 4, "--seqlen", 16, "--batch-size", 2]


def test_owners_balance_cost_and_agree_everywhere():
    # A LLaMA-7B decoder layer: q, k, v, o [4096, 4096]; gate, up [11008, 4096]; down [4096, 11008].
    shapes = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
              "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}
    costs = {name: linear_cost(*shape) for name, shape in shapes.items()}
    for world in (2, 3, 4, 8):
        owners = assign_owners(costs, world)
        assert owners == assign_owners(dict(reversed(list(costs.items()))), world)  # order-free: same on every rank
        loads = [sum(costs[n] for n in owners if owners[n] == r) for r in range(world)]
        # LPT is within 4/3 of the best makespan, which is at least the largest item and the mean load
        assert max(loads) <= 4 / 3 * max(max(costs.values()), sum(costs.values()) / world) + 1e-6
        assert len(set(owners.values())) == min(world, len(costs))  # nobody idle while a linear waits
    assert costs["down"] > costs["up"]  # the cubic term of the wider input dominates


def test_every_batch_goes_to_exactly_one_rank_in_order():
    batches = list(range(7))
    for world in (1, 2, 3, 7):
        shares = [split_batches(batches, rank, world) for rank in range(world)]
        assert sum(shares, []) == batches
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="--batch-size"):
        split_batches(batches, 0, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, *args, kill: tuple[int, str] | None = None, hang: tuple[int, str] | None = None,
            timeout: float = 300) -> list:
    """[(returncode, stdout, stderr)] of ``world`` ranks of tests/rank_runner.py ARGS (``kill``/``hang``: (rank, where
    that rank is SIGKILLed / sleeps))."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "SPARSEKERN_BACKEND": "torch", "HF_HUB_OFFLINE": "1"}
        killed = ["--kill-at", kill[1]] if kill is not None and kill[0] == rank else \
            ["--hang-at", hang[1]] if hang is not None and hang[0] == rank else []
        procs.append(subprocess.Popen([sys.executable, str(RUNNER), *killed, *map(str, args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [procs[0].communicate(timeout=timeout)]  # rank 0 ends, even when another hangs
        for p in procs[1:]:
            try:
                outputs.append(p.communicate(timeout=timeout if hang is None else 10))
            except subprocess.TimeoutExpired:  # the hung rank itself: nothing ends its sleep
                p.kill()
                outputs.append(p.communicate())
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    finally:
        for p in procs:
            p.kill()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name != "permutations.safetensors":
            tensors.update(load_file(path))
    return tensors


def _assert_same_model(got: dict, expected: dict, atol: float) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name] == 0, expected[name] == 0), f"{name}: the mask differs"
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol, msg=name)


# sparsegpt (unstructured) is compared with one process in the killed-rank test below, which stays fast too
@pytest.mark.parametrize("method, sparsity, atol", [("wanda", "0.5", 0.0),
                                                    pytest.param("sparsegpt", "2:4", 1e-5, marks=pytest.mark.slow)])
def test_two_ranks_prune_like_one_process(tmp_path, text_file, method, sparsity, atol):
    """wanda: identical masks and weights; sparsegpt: identical masks, weights within fp32 rounding (the Hessians
    are sums over the ranks in another order)."""
    source = tiny_llama_checkpoint(tmp_path / "src")
    options = dict(method=method, sparsity=sparsity, calib=str(text_file), nsamples=4, seqlen=16, batch_size=2,
                   progress=False, device="cpu")
    prune_checkpoint(source, tmp_path / "one", **options)
    results = _launch(2, source, "--method", method, "--sparsity", sparsity, "--calib", text_file, *CALIBRATION,
                      "--quiet", "--json", "--out", tmp_path / "two")
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    summary = json.loads(results[0][1].strip().splitlines()[-1])
    assert summary["streamed"] and summary["linears"] == 14
    _assert_same_model(_tensors(tmp_path / "two"), _tensors(tmp_path / "one"), atol)
    one, two = (json.loads((tmp_path / d / "sparsity.json").read_text()) for d in ("one", "two"))
    assert [r["name"] for r in two["layers"]] == [r["name"] for r in one["layers"]]  # every linear, in order
    assert not any(tmp_path.glob(".two.layers-*"))  # no rank left scratch folders behind


def test_a_killed_rank_stops_the_job_with_its_name_and_layer_and_a_rerun_resumes(tmp_path, text_file):
    source = tiny_llama_checkpoint(tmp_path / "src", layers=3)
    args = [source, "--method", "sparsegpt", "--calib", text_file, *CALIBRATION, "--quiet", "--out", tmp_path / "out"]
    results = _launch(2, *args, kill=(1, "model.layers.1."))
    (code0, _, err0), (code1, _, _) = results
    assert code1 == -9 and code0 == 1, err0[-2000:]
    assert "rank 1" in err0 and "model.layers.1" in err0 and "rerun the same command to resume" in err0, err0
    assert len([line for line in err0.splitlines() if "error:" in line]) == 1  # one message, no traceback
    manifest = json.loads((tmp_path / "out.partial" / "manifest.json").read_text())
    assert manifest["completed_layers"] == 1 and not (tmp_path / "out").exists()

    results = _launch(2, *args)
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    assert "resuming from" in results[0][2] and "1 of 3 layers" in results[0][2]
    assert not (tmp_path / "out.partial").exists()
    prune_checkpoint(source, tmp_path / "one", method="sparsegpt", calib=str(text_file), nsamples=4, seqlen=16,
                     batch_size=2, progress=False, device="cpu")
    _assert_same_model(_tensors(tmp_path / "out"), _tensors(tmp_path / "one"), 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_python_api_inside_a_process_group_gives_every_rank_the_pruned_model(tmp_path, text_file, method):
    import sparsekern
    from sparsekern.models import load_model

    source = tiny_llama_checkpoint(tmp_path / "src")
    results = _launch(2, "--api", tmp_path / "pruned", source, text_file, method)
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    model, tokenizer = load_model(source, dtype="float32")
    sparsekern.prune(model, tokenizer, method=method, calib=str(text_file), nsamples=4, seqlen=16, batch_size=2,
                     progress=False, device="cpu")
    expected = {k: v.contiguous() for k, v in model.state_dict().items()}
    for rank in range(2):
        _assert_same_model(load_file(tmp_path / f"pruned.{rank}.safetensors"), expected, 0.0)


@pytest.mark.slow
def test_an_allocation_fitted_on_all_samples_is_refused_distributed(tmp_path, text_file):
    source = tiny_llama_checkpoint(tmp_path / "src")
    results = _launch(2, source, "--method", "wanda", "--allocation", "owl", "--no-stream", "--calib", text_file,
                      *CALIBRATION, "--quiet", "--out", tmp_path / "out")
    for code, _, err in results:
        assert code in (1, 2) and ("--allocation owl is not distributed" in err or "rank" in err), err[-2000:]
    assert "FILE.json" in results[0][2]


@pytest.mark.slow
def test_a_hung_rank_stops_the_job_after_the_timeout_naming_it(tmp_path, text_file):
    source = tiny_llama_checkpoint(tmp_path / "src")
    results = _launch(2, source, "--method", "wanda", "--calib", text_file, *CALIBRATION, "--quiet", "--dist-timeout",
                      20, "--out", tmp_path / "out", hang=(1, "model.layers.1."), timeout=120)
    code0, _, err0 = results[0]
    assert code0 == 1 and "rank 1" in err0 and "model.layers.1" in err0 and "--dist-timeout" in err0, err0[-2000:]
