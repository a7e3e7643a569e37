"""Every bad input a user can give, from the command line and from Python: refused at once with exit code 2 (the
API: one ValueError or TypeError) and one line naming the input and the fix, with nothing written, and before
the model is loaded wherever the input alone shows it is wrong."""

import time

import pytest
import torch
from checks import run_cli as run

import sparsekern
from sparsekern import models


@pytest.fixture
def files(tmp_path):
    paths = {"text": tmp_path / "calib.txt", "empty": tmp_path / "empty.txt", "binary": tmp_path / "binary.txt",
             "short": tmp_path / "short.txt", "broken": tmp_path / "broken"}
    paths["text"].write_text("The quick brown fox jumps over the lazy dog. " * 40)
    paths["empty"].write_text("")
    paths["binary"].write_bytes(bytes(range(256)) * 4)
    paths["short"].write_text("too short")
    paths["broken"].mkdir()
    (paths["broken"] / "config.json").write_text("{not json")
    return paths


# (arguments after `prune MODEL --out OUT`, words of the error, refused before the model is loaded)
PRUNE_CASES = [
    (["--method", "nosuch"], "invalid choice: 'nosuch'", True),
    (["--sparsity", "1.5"], "outside [0, 1)", True),
    (["--sparsity", "4:4"], "0 < N < M", True),
    (["--sparsity", "2:x"], "2:x", True),
    (["--sparsity", "half"], "half", True),
    (["--sparsity", "3:7"], "not divisible by M=7", False),
    (["--calib", "nosuchcorpus"], "nosuchcorpus", True),
    (["--calib", "{missing}"], "does not exist", True),
    (["--calib", "{empty}"], "is empty", True),
    (["--calib", "{binary}"], "is not UTF-8 text", True),
    (["--calib", "{short}", "--seqlen", "64"], "fewer than the 65 needed", False),
    (["--seqlen", "100000"], "exceeds the model's max_position_embeddings", False),
    (["--nsamples", "0"], "nsamples and seqlen must be positive", True),
    (["--seqlen", "-3"], "nsamples and seqlen must be positive", True),
    (["--batch-size", "0"], "batch_size must be positive", True),
    (["--method", "sparsegpt", "--wbits", "1"], "--wbits 1: must be between 2 and 16", True),
    (["--method", "sparsegpt", "--wbits", "17"], "--wbits 17: must be between 2 and 16", True),
    (["--method", "sparsegpt", "--groupsize", "64"], "groupsize only applies with quantization", True),
    (["--method", "sparsegpt", "--blocksize", "0"], "--blocksize 0: must be positive", True),
    (["--percdamp", "0"], "--percdamp 0.0: must be positive", True),
    (["--percdamp", "-1"], "--percdamp -1.0: must be positive", True),
    # joint quantization is SparseGPT's: with the default method the error names the method that takes it
    (["--wbits", "4"], "--wbits is not an option of the chosen steps (method admm); it is taken by: method sparsegpt",
     True),
    (["--method", "wanda", "--wbits", "4"], "--wbits is not an option of the chosen steps (method wanda)", True),
    (["--override", "nonsense"], "GLOB=PATTERN", True),
    (["--override", "*.no_such_proj=0.6"], "matches no linear layer", False),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda", True),
    (["--device", "tpu"], "--device tpu: not a device sparsekern runs on", True),
    (["--bos", "always"], "--bos always: this tokenizer has no BOS token", False),
    (["--bos", "sometimes"], "invalid choice: 'sometimes'", True),
    (["--dtype", "float64"], "invalid choice: 'float64'", True),
]


@pytest.mark.parametrize("extra, words, before_load", PRUNE_CASES, ids=[" ".join(c[0]) for c in PRUNE_CASES])
def test_bad_prune_input_is_refused_clearly(capsys, tmp_path, tiny_folder, files, monkeypatch, extra, words,
                                            before_load):
    if before_load:
        no_load(monkeypatch)
    extra = [a.format(missing=tmp_path / "missing.txt", **files) for a in extra]
    if "--calib" not in extra:
        extra += ["--calib", files["text"]]
    out = tmp_path / "out"
    capsys.readouterr()  # the fixture's own output
    started = time.monotonic()
    code, stdout, stderr = run(capsys, "prune", tiny_folder, "--nsamples", 2, "--seqlen", 16, "--quiet", "--out",
                               out, *extra)
    assert code == 2, stderr
    assert words in stderr, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny", *(p.name for p in files.values())])


def no_load(monkeypatch):
    """Loading the model fails the test: for inputs that are wrong whatever the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before a bad input was refused")

    monkeypatch.setattr(models, "load_model", refuse)


def test_out_at_or_inside_the_input_model_is_refused(capsys, tmp_path, tiny_folder, files, monkeypatch):
    no_load(monkeypatch)
    before = sorted(p.name for p in tiny_folder.iterdir())
    for out in [tiny_folder, tiny_folder / "pruned", tmp_path]:
        for overwrite in ([], ["--overwrite"]):
            code, _, stderr = run(capsys, "prune", tiny_folder, "--calib", files["text"], "--nsamples", 2,
                                  "--seqlen", 16, "--quiet", "--out", out, *overwrite)
            assert code == 2 and "the input model folder" in stderr, stderr
    assert sorted(p.name for p in tiny_folder.iterdir()) == before


def test_an_unwritable_destination_is_refused_before_work(capsys, tmp_path, tiny_folder, files, monkeypatch):
    no_load(monkeypatch)
    original = models.tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and str(dir) == str(tmp_path / "ro"):
            raise OSError(30, "Read-only file system")
        return original(*args, dir=dir, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(models.tempfile, "TemporaryFile", read_only)
    code, _, stderr = run(capsys, "prune", tiny_folder, "--calib", files["text"], "--out", tmp_path / "ro" / "out")
    assert code == 2 and "cannot write into" in stderr and "Read-only file system" in stderr


def test_corrupt_config_and_other_commands(capsys, tmp_path, tiny_folder, files):
    code, _, stderr = run(capsys, "prune", files["broken"], "--out", tmp_path / "o")
    assert code == 2 and "config.json cannot be read as JSON" in stderr
    code, _, stderr = run(capsys, "eval", files["broken"])
    assert code == 2 and "the checkpoint is damaged" in stderr
    code, _, stderr = run(capsys, "generate", tiny_folder, "--prompt", "  ")
    assert code == 2 and "--prompt is empty" in stderr
    for extra, words in [(["--seqlen", "1"], "--seqlen must be at least 2"),
                         (["--max-windows", "0"], "--max-windows positive"),
                         (["--data", files["binary"]], "is not UTF-8 text")]:
        code, _, stderr = run(capsys, "eval", tiny_folder, *extra)
        assert code == 2 and words in stderr, stderr


def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_taken_over(capsys, tmp_path, tiny_folder, files):
    out = tmp_path / "out"
    lock = tmp_path / "out.lock"
    lock.write_text("1\n")  # pid 1 is alive: another run holds --out
    code, _, stderr = run(capsys, "prune", tiny_folder, "--calib", files["text"], "--nsamples", 2, "--seqlen", 16,
                          "--quiet", "--out", out)
    assert code == 2 and "another sparsekern run (pid 1)" in stderr and not out.exists()
    lock.write_text("999999999\n")  # no such process: a crashed run's lock
    code, _, stderr = run(capsys, "prune", tiny_folder, "--method", "magnitude", "--quiet", "--out", out)
    assert code == 0, stderr
    assert (out / "config.json").is_file() and not lock.exists()


@pytest.mark.parametrize("arguments, error, words", [
    ({"method": "nosuch"}, ValueError, "unknown method 'nosuch'"),
    ({"sparsity": "abc"}, ValueError, "abc"),
    ({"nsamples": "8"}, TypeError, "nsamples must be int"),
    ({"seqlen": 16.0}, TypeError, "seqlen must be int"),
    ({"batch_size": True}, TypeError, "batch_size must be int"),
    ({"percdamp": "0.01"}, TypeError, "option percdamp must be float, got str"),
    ({"ria_alpha": 1.0}, ValueError, "--ria-alpha is not an option of the chosen steps (method admm)"),
    ({"nosuch_option": 1}, TypeError, "unknown option 'nosuch_option'"),
    ({"update": "obs"}, ValueError, "method 'admm' already updates the kept weights"),
    ({"refine": "nosuch"}, ValueError, "unknown refine 'nosuch'"),
    ({"calib": torch.full((2, 16), 500)}, ValueError, "calibration ids must lie in [0, 129)"),
    ({"calib": torch.full((2, 16), -1)}, ValueError, "calibration ids must lie in [0, 129)"),
    ({"calib": torch.zeros(2, 16)}, ValueError, "integer tensor"),
    ({"bos": "sometimes"}, ValueError, "bos 'sometimes' is not one of"),
])
def test_bad_api_arguments(tiny_llama, char_tokenizer, arguments, error, words):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    options = {"calib": torch.randint(0, 129, (2, 16)), "progress": False, **arguments}
    with pytest.raises(error, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        sparsekern.prune(tiny_llama, char_tokenizer, **options)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())  # nothing pruned
