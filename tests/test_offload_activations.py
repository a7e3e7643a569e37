"""DiskActivations: the calibration activations on disk (--offload-activations DIR), one file per batch."""

import errno
import gc
import os
import subprocess
import sys
from collections.abc import MutableSequence

import pytest
import torch
from checks import run_cli, tiny_llama_checkpoint

from sparsekern import offload
from sparsekern.offload import DiskActivations, OffloadError

_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(_BITS[a.dtype]), b.contiguous().view(_BITS[b.dtype]))


def _sample(shape, dtype, seed):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if t.numel() > 2:  # special values must survive bit for bit
        t.view(-1)[:3] = torch.tensor([float("nan"), float("-inf"), -0.0], dtype=dtype)
    return t


SHAPES = [(3, 5, 7), (1, 123, 127), (2, 1, 5), (), (0, 4)]


def _files(acts):
    return sorted(os.listdir(acts.path))


@pytest.mark.parametrize("staged", [False, True], ids=["cpu", "staged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_identical(tmp_path, monkeypatch, dtype, staged):
    if staged:  # the accelerator path (through the staging buffer, in several chunks) run with CPU tensors
        monkeypatch.setattr(offload, "_STAGING", 1000)
    tensors = [_sample(shape, dtype, seed) for seed, shape in enumerate(SHAPES)]
    tensors.append(_sample((6, 9), dtype, 9).t())  # not contiguous
    with DiskActivations(tmp_path, device="cpu") as acts:
        acts._force_staging = staged
        assert isinstance(acts, MutableSequence)
        for t in tensors:
            acts.append(t)
        assert len(acts) == len(tensors) == len(_files(acts))
        assert acts.nbytes == sum(t.numel() * t.element_size() for t in tensors)
        for b, t in enumerate(tensors):
            got = acts[b]
            assert got.device == acts.device == torch.device("cpu")
            assert got.is_contiguous()
            assert _same_bits(got, t), (b, tuple(t.shape))
            assert acts.meta(b).shape == t.shape and acts.meta(b).dtype == t.dtype


def test_replacement_drops_old_file_and_is_atomic(tmp_path):
    with DiskActivations(tmp_path) as acts:
        acts.extend([torch.full((2, 3, 4), float(b)) for b in range(3)])
        before = _files(acts)
        first = acts[1]
        acts[1] = torch.full((2, 5, 4), 7.0, dtype=torch.bfloat16)  # another shape and dtype
        assert _files(acts) == before  # renamed over the old file: no .tmp left, nothing extra
        assert torch.equal(first, torch.full((2, 3, 4), 1.0))  # a tensor already read is the caller's
        assert acts[1].dtype == torch.bfloat16 and acts[1].shape == (2, 5, 4)
        assert torch.equal(acts[1].float(), torch.full((2, 5, 4), 7.0))
        assert acts.nbytes == 2 * 24 * 4 + 40 * 2
        acts[-1] = torch.zeros(1)
        assert torch.equal(acts[2], torch.zeros(1))
        # the pipeline's own pattern: replace each while iterating
        for b, h in enumerate(acts):
            acts[b] = h.float() + 1
        assert [acts[b].flatten()[0].item() for b in range(3)] == [1.0, 8.0, 1.0]
        with pytest.raises(IndexError):
            acts[3] = torch.zeros(1)
        with pytest.raises(TypeError, match="expected a torch.Tensor"):
            acts[0] = [1.0]


def test_sequence_operations(tmp_path):
    with DiskActivations(tmp_path) as acts:
        assert len(acts) == 0 and list(acts) == [] and acts.nbytes == 0
        for b in range(4):
            acts.append(torch.tensor([float(b)]))
        acts.insert(0, torch.tensor([-1.0]))
        acts.insert(-1, torch.tensor([2.5]))
        acts.insert(100, torch.tensor([9.0]))
        values = [t.item() for t in acts]
        assert values == [-1.0, 0.0, 1.0, 2.0, 2.5, 3.0, 9.0]
        assert [t.item() for t in acts[1:3]] == [0.0, 1.0]
        assert acts[-1].item() == 9.0
        del acts[0]
        assert acts.pop().item() == 9.0
        del acts[1:3]
        assert [t.item() for t in acts] == [0.0, 2.5, 3.0]
        assert len(_files(acts)) == 3
        acts.reverse()
        assert [t.item() for t in acts] == [3.0, 2.5, 0.0]
        with pytest.raises(IndexError, match="out of range"):
            acts[3]
        acts.clear()
        assert len(acts) == 0 and _files(acts) == []
        acts.append(torch.ones(2))  # usable after clear, as capture_layer_inputs needs
        assert torch.equal(acts[0], torch.ones(2))


def test_reading_one_item_opens_only_its_file(tmp_path, monkeypatch):
    with DiskActivations(tmp_path) as acts:
        acts.extend([torch.full((3, 4), float(b)) for b in range(4)])
        names = [item.name for item in acts._items]
        opened = []
        real_open = os.open
        monkeypatch.setattr(offload.os, "open", lambda path, *a, **k: opened.append(os.fspath(path)) or
                            real_open(path, *a, **k))
        assert torch.equal(acts[2], torch.full((3, 4), 2.0))
        assert opened == [str(acts.path / names[2])]
        for b in (0, 1, 3):  # the others are not needed to read this one
            os.unlink(acts.path / names[b])
        assert torch.equal(acts[2], torch.full((3, 4), 2.0))
        with pytest.raises(OffloadError, match=r"reading batch 1 failed .*keep the folder untouched"):
            acts[1]


def test_close_removes_only_its_subfolder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    acts = DiskActivations(tmp_path)
    acts.append(torch.ones(3))
    other = DiskActivations(tmp_path)
    other.append(torch.ones(3))
    assert acts.path.parent == tmp_path and acts.path.name.startswith(offload.PREFIX)
    acts.close()
    assert not acts.path.exists() and acts.closed
    acts.close()  # idempotent
    assert tmp_path.is_dir() and (tmp_path / "keep.txt").read_text() == "mine"
    assert torch.equal(other[0], torch.ones(3))  # another instance in the same DIR is left alone
    with pytest.raises(ValueError, match="closed"):
        acts[0]
    with pytest.raises(ValueError, match="closed"):
        acts.append(torch.ones(1))
    with other:
        pass
    assert not other.path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_folder_removed_when_garbage_collected(tmp_path):
    acts = DiskActivations(tmp_path)
    acts.append(torch.ones(5))
    path = acts.path
    del acts
    gc.collect()
    assert not path.exists() and tmp_path.is_dir()


def test_folder_removed_at_interpreter_exit(tmp_path):
    # offload.py needs only torch and numpy: loaded by path, without the package's heavier imports
    code = ("import importlib.util, sys, torch\n"
            f"spec = importlib.util.spec_from_file_location('offload', {offload.__file__!r})\n"
            "module = sys.modules['offload'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "acts = module.DiskActivations(sys.argv[1])\nacts.append(torch.ones(5))\nprint(acts.path)\n"
            "sys.modules['__main__'].keep = acts\n")  # still referenced when the interpreter exits
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    assert path.startswith(str(tmp_path)) and not os.path.exists(path)
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []


def test_missing_or_file_dir_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(OffloadError, match=rf"--offload-activations {missing}: no such folder: create it"):
        DiskActivations(missing)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(OffloadError, match=rf"--offload-activations {a_file}: not a folder"):
        DiskActivations(a_file)
    assert not missing.exists()


def test_unwritable_dir_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(offload.tempfile, "mkdtemp", refuse)  # root ignores permission bits: refuse by hand
    with pytest.raises(OffloadError, match=rf"--offload-activations {tmp_path}: cannot create a folder in it "
                                           r"\(Permission denied\): make it writable or choose another folder"):
        DiskActivations(tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_dir_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(OffloadError, match=rf"--offload-activations {locked}: cannot create a folder in it"):
            DiskActivations(locked)
    finally:
        locked.chmod(0o700)


def test_full_disk_error_keeps_the_list_as_it_was(tmp_path, monkeypatch):
    with DiskActivations(tmp_path) as acts:
        acts.extend([torch.zeros(4), torch.ones(4)])
        before = _files(acts)
        real_write = offload._write_all

        def full(fd, data):
            real_write(fd, data[: len(data) // 2])  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(offload, "_write_all", full)
        message = (rf"sparsekern: --offload-activations {tmp_path}: writing batch 1 failed \(No space left on "
                   r"device\): free space or choose another folder")
        with pytest.raises(OffloadError, match=message) as info:
            acts[1] = torch.full((4,), 5.0)
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(OffloadError, match="writing batch 2 failed"):
            acts.append(torch.full((4,), 5.0))
        assert len(acts) == 2 and _files(acts) == before  # no half file, no .tmp, the old item intact
        assert torch.equal(acts[1], torch.ones(4))


def test_device_attribute(tmp_path):
    with DiskActivations(tmp_path, device="cpu") as acts:
        acts.append(torch.ones(2, 3))
        assert acts.device == torch.device("cpu") and acts[0].device == acts.device
        assert "1 items" in repr(acts)


@pytest.mark.gpu
def test_cuda_round_trip(tmp_path):
    with DiskActivations(tmp_path, device="cuda") as acts:
        t = _sample((4, 33, 130), torch.bfloat16, 0).cuda()
        acts.append(t)
        acts.append(t.cpu())
        assert acts[0].device.type == "cuda" and _same_bits(acts[0].cpu(), t.cpu())
        assert _same_bits(acts[1].cpu(), t.cpu())
        assert acts._staging.is_pinned()


# -- the pipeline with --offload-activations ------------------------------------------------------------------------


def test_pruning_with_activations_on_disk_gives_the_same_weights(tmp_path, text_file):
    import sparsekern
    from sparsekern.models import load_model

    source = tiny_llama_checkpoint(tmp_path / "src", layers=3)
    results = []
    for offload_dir in (None, tmp_path / "acts"):
        if offload_dir is not None:
            offload_dir.mkdir()
        model, tokenizer = load_model(source, dtype="float32")
        sparsekern.prune(model, tokenizer, method="sparsegpt", calib=str(text_file), nsamples=4, seqlen=16,
                         batch_size=2, progress=False, device="cpu", offload_activations=offload_dir)
        results.append(model.state_dict())
    for name, tensor in results[0].items():
        assert torch.equal(tensor, results[1][name]), name
    assert os.listdir(tmp_path / "acts") == []  # its subfolder is gone


def test_a_missing_activation_folder_fails_before_the_model_loads(capsys, tmp_path, text_file):
    code, _, stderr = run_cli(capsys, "prune", tmp_path / "no-model", "--offload-activations", tmp_path / "missing",
                              "--calib", text_file, "--out", tmp_path / "out")
    assert code == 2 and "--offload-activations" in stderr and str(tmp_path / "missing") in stderr, stderr


def test_an_interrupted_offloaded_run_resumes_by_replaying_the_finished_layers(capsys, tmp_path, text_file,
                                                                                interrupt_at):
    """The resume state holds no activations with --offload-activations: the rerun rebuilds them by running the
    recorded layers again, and ends with the uninterrupted run's checkpoint."""
    from sparsekern.prune.sparsegpt import SparseGPT

    source = tiny_llama_checkpoint(tmp_path / "src", layers=3)
    (tmp_path / "acts").mkdir()
    common = ["--method", "sparsegpt", "--calib", text_file, "--nsamples", 4, "--seqlen", 16, "--batch-size", 2,
              "--quiet", "--offload-activations", tmp_path / "acts"]
    assert run_cli(capsys, "prune", source, *common, "--out", tmp_path / "reference")[0] == 0
    original = interrupt_at(SparseGPT, "model.layers.2.")
    code, _, stderr = run_cli(capsys, "prune", source, *common, "--out", tmp_path / "out")
    assert code == 130 and "interrupted after layer 1" in stderr, stderr
    from safetensors.torch import load_file

    assert load_file(tmp_path / "out.partial" / "hidden-00002.safetensors") == {}  # no activations recorded
    SparseGPT.prune_linear = original
    code, _, stderr = run_cli(capsys, "prune", source, *common, "--out", tmp_path / "out")
    assert code == 0 and "2 of 3 layers already pruned" in stderr, stderr
    for path in sorted((tmp_path / "reference").glob("*.safetensors")):
        assert path.read_bytes() == (tmp_path / "out" / path.name).read_bytes(), path.name
    assert os.listdir(tmp_path / "acts") == []
