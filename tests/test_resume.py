"""Crash-proof resume: one commit point per layer, checked on load; a run killed anywhere (SIGKILL at every write
boundary and at random moments) and rerun gives the uninterrupted run's checkpoint bit for bit; the same command
twice gives the same bytes; a state from another model or settings, or a damaged one, is refused."""

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsekern
from sparsekern.prune.sparsegpt import SparseGPT
from sparsekern.resume import MANIFEST, ResumeError

RUNNER = Path(__file__).with_name("fault_runner.py")
OPTIONS = dict(method="sparsegpt", sparsity="2:4", progress=False, batch_size=2)


def fresh_model(tiny_llama):
    model = type(tiny_llama)(tiny_llama.config).eval()
    model.load_state_dict(tiny_llama.state_dict())
    return model


def calibration_ids(samples=4):
    return torch.randint(0, 129, (samples, 16), generator=torch.Generator().manual_seed(0))


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_llama, tmp_path, monkeypatch, interrupt_at):
    expected = fresh_model(tiny_llama)
    sparsekern.prune(expected, calib=calibration_ids(), **OPTIONS)

    crashed = fresh_model(tiny_llama)
    original = interrupt_at(SparseGPT, "model.layers.1.")
    with pytest.raises(KeyboardInterrupt):
        sparsekern.prune(crashed, calib=calibration_ids(), resume_dir=str(tmp_path / "partial"), **OPTIONS)
    state = json.loads((tmp_path / "partial" / MANIFEST).read_text())
    assert state["completed_layers"] == 1 and state["time_s"] > 0
    assert sorted(state["files"]) == ["hidden-00001.safetensors", "layer00000.safetensors"]
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == sorted([MANIFEST, *state["files"]])

    resumed = fresh_model(tiny_llama)  # a new process: the model is dense again
    calls = []
    monkeypatch.setattr(SparseGPT, "prune_linear",
                        lambda self, *args: calls.append(args[-1]) or original(self, *args))
    report = sparsekern.prune(resumed, calib=calibration_ids(), resume_dir=str(tmp_path / "partial"), **OPTIONS)
    assert calls and all(name.startswith("model.layers.1.") for name in calls)  # layer 0 was not redone
    assert len(report.linears) == 2 * 7
    assert report.time_s > state["time_s"]  # the interrupted run's time counts
    for (name, a), b in zip(expected.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def _interrupted_state(tiny_llama, tmp_path, interrupt_at, calibration=None):
    interrupt_at(SparseGPT, "model.layers.1.")
    with pytest.raises(KeyboardInterrupt):
        sparsekern.prune(fresh_model(tiny_llama), calib=calibration_ids() if calibration is None else calibration,
                         resume_dir=str(tmp_path / "p"), **OPTIONS)
    return tmp_path / "p"


def test_state_of_other_settings_data_or_weights_is_refused(tiny_llama, tmp_path, interrupt_at, monkeypatch):
    folder = _interrupted_state(tiny_llama, tmp_path, interrupt_at)
    monkeypatch.undo()
    with pytest.raises(ResumeError, match="partial run of another model, settings or calibration data.*--restart"):
        sparsekern.prune(fresh_model(tiny_llama), **{**OPTIONS, "sparsity": "0.5"}, calib=calibration_ids(),
                         resume_dir=str(folder))
    with pytest.raises(ResumeError, match="partial run of another"):
        sparsekern.prune(fresh_model(tiny_llama), calib=calibration_ids(5), resume_dir=str(folder), **OPTIONS)
    other = fresh_model(tiny_llama)  # the same config, other weights: another model folder
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(ResumeError, match="partial run of another"):
        sparsekern.prune(other, calib=calibration_ids(), resume_dir=str(folder), **OPTIONS)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete"])
def test_damaged_state_is_refused(tiny_llama, tmp_path, interrupt_at, monkeypatch, damage):
    folder = _interrupted_state(tiny_llama, tmp_path, interrupt_at)
    monkeypatch.undo()
    hidden = folder / "hidden-00001.safetensors"
    data = bytearray(hidden.read_bytes())
    if damage == "flip a byte":
        data[-1] ^= 0xFF
        hidden.write_bytes(bytes(data))
    elif damage == "truncate":
        hidden.write_bytes(bytes(data[:-8]))
    else:
        hidden.unlink()
    with pytest.raises(ResumeError, match="hidden-00001.safetensors is missing or damaged.*--restart"):
        sparsekern.prune(fresh_model(tiny_llama), calib=calibration_ids(), resume_dir=str(folder), **OPTIONS)


def test_a_write_error_names_the_folder_and_keeps_the_last_recorded_layer(tiny_llama, tmp_path, monkeypatch):
    from sparsekern import resume

    real = resume._replace

    def full_disk(tmp, path):
        if path.name == "hidden-00002.safetensors":
            raise OSError(28, "No space left on device")
        real(tmp, path)

    monkeypatch.setattr(resume, "_replace", full_disk)
    with pytest.raises(OSError, match=r"could not record progress in .*No space left on device.*rerun the same "
                                      r"command to resume, or pass --no-resume"):
        sparsekern.prune(fresh_model(tiny_llama), calib=calibration_ids(), resume_dir=str(tmp_path / "p"),
                         **OPTIONS)
    assert json.loads((tmp_path / "p" / MANIFEST).read_text())["completed_layers"] == 1


# -- the command line, killed with SIGKILL ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """A tiny model folder and calibration text, the uninterrupted run's checkpoint, and how to run the CLI."""
    from conftest import _make_char_tokenizer, _make_tiny_llama

    root = tmp_path_factory.mktemp("faults")
    _make_tiny_llama().save_pretrained(root / "model")
    _make_char_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text("Every layer has one commit point, and a crash anywhere else is harmless. " * 30)

    def run(mode, value, out, timeout=120):
        argv = [sys.executable, str(RUNNER), mode, str(value), "prune", str(root / "model"), "--method", "sparsegpt",
                "--sparsity", "2:4", "--calib", str(root / "calib.txt"), "--nsamples", "4", "--seqlen", "16",
                "--batch-size", "2", "--device", "cpu", "--quiet", "--out", str(out)]
        env = {**os.environ, "TRITON_INTERPRET": "1", "SPARSEKERN_BACKEND": "torch"}
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)

    reference = root / "reference"
    done = run("count", 0, reference)
    assert done.returncode == 0, done.stderr[-2000:]
    boundaries = int(done.stderr.rsplit("boundaries: ", 1)[1].split()[0])
    return root, run, reference, boundaries


def checkpoint_digest(out: Path) -> tuple[str, dict]:
    """(sha256 of the weight files and index, sparsity.json without its timings). The CLI streams the model: one
    shard per decoder layer and model.safetensors.index.json."""
    def untimed(value):
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if k != "time_s"}
        if isinstance(value, list):
            return [untimed(v) for v in value]
        return value

    digest = hashlib.sha256()
    for path in sorted(out.glob("model*.safetensors*")):
        digest.update(path.name.encode() + path.read_bytes())
    weights = digest.hexdigest()
    return weights, untimed(json.loads((out / "sparsity.json").read_text()))


def test_the_same_command_twice_gives_the_same_bytes(cli_setup):
    root, run, reference, _ = cli_setup
    again = root / "again"
    assert run("count", 0, again).returncode == 0
    assert checkpoint_digest(again) == checkpoint_digest(reference)


def kill_and_rerun(cli_setup, name, mode, value) -> bool:
    """Kill a run at one moment, rerun the same command; True when the result equals the uninterrupted run."""
    root, run, reference, _ = cli_setup
    out = root / name
    killed = run(mode, value, out)
    assert killed.returncode in (-9, 0), killed.stderr[-2000:]
    rerun = run("count", 0, out)
    finished_before = killed.returncode == 0 or "already exists" in rerun.stderr
    assert rerun.returncode == 0 or finished_before, rerun.stderr[-2000:]
    assert not Path(f"{out}.partial").exists() or finished_before
    return checkpoint_digest(out) == checkpoint_digest(reference)


# The tiny model's run has 30 boundaries: 14 per layer (fsync and rename of the weights, of the inputs and of the
# manifest, then the folder's fsync; before and after each), then the checkpoint's swap into place. make test kills
# at three: the last layer's inputs renamed but its manifest not yet (22), just before the manifest's rename (25),
# and just before the checkpoint's swap (-2 from the end); the slow test kills at all of them.
FAST_POINTS = [("boundary", 22), ("boundary", 25), ("boundary", -2)]


@pytest.mark.parametrize("mode, value", FAST_POINTS)
def test_sigkill_at_a_write_boundary_then_rerun_gives_the_same_checkpoint(cli_setup, mode, value):
    boundaries = cli_setup[3]
    assert boundaries == 30, "the kill points above were chosen for 30 boundaries"
    point = value if value > 0 else boundaries + 1 + value
    assert kill_and_rerun(cli_setup, f"fast-{point}", mode, point)


@pytest.mark.slow
def test_sigkill_everywhere_then_rerun_gives_the_same_checkpoint(cli_setup):
    """Every write boundary, and 24 random moments over the run's length: the count is in the assertion."""
    boundaries = cli_setup[3]
    rng = random.Random(0)
    points = [("boundary", n) for n in range(1, boundaries + 1)] + [("after", round(rng.uniform(2.0, 9.0), 2))
                                                                     for _ in range(24)]
    differing = [point for point in points if not kill_and_rerun(cli_setup, f"{point[0]}-{point[1]}", *point)]
    assert not differing, f"{len(differing)} of {len(points)} kill points gave another checkpoint: {differing}"
