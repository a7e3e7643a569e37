"""The command line on a tiny random model: outputs, summary, and clear errors that leave nothing behind."""

import json

import pytest
from checks import run_cli as run


@pytest.mark.parametrize("method, sparsity", [("sparsegpt", "0.5"), ("wanda", "2:4"), ("magnitude", "4:8")])
def test_prune_json_and_checkpoint(capsys, tmp_path, tiny_folder, text_file, method, sparsity):
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "prune", tiny_folder, "--method", method, "--sparsity", sparsity, "--calib",
                          text_file, "--nsamples", 4, "--seqlen", 32, "--out", out, "--json", "--quiet")
    assert code == 0
    result = json.loads(stdout)
    assert {"method", "pattern", "sparsity", "time_s", "out"} <= result.keys()
    assert result["method"] == method and result["pattern"] == sparsity
    assert result["sparsity"] == pytest.approx(0.5, abs=1e-6)
    record = json.loads((out / "sparsity.json").read_text())
    assert record["method"] == method and len(record["layers"]) == 2 * 7
    # streamed by default: a sharded checkpoint (model.safetensors.index.json); --no-stream: one model.safetensors
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file()


def test_prune_table_and_override(capsys, tmp_path, tiny_folder, text_file):
    code, stdout, _ = run(capsys, "prune", tiny_folder, "--method", "wanda", "--calib", text_file, "--nsamples", 2,
                          "--seqlen", 16, "--override", "*.layers.1.*=dense", "--out", tmp_path / "o", "--quiet")
    assert code == 0
    assert "model.layers.0" in stdout and "model.layers.1 " not in stdout
    assert "wanda 0.5" in stdout


def test_eval_and_generate(capsys, tiny_folder, text_file):
    code, stdout, _ = run(capsys, "eval", tiny_folder, "--data", text_file, "--seqlen", 32, "--json", "--quiet")
    assert code == 0
    result = json.loads(stdout)
    assert result["perplexity"] > 1 and result["tokens"] == result["windows"] * 31
    code, stdout, _ = run(capsys, "generate", tiny_folder, "--prompt", "abc", "--max-new-tokens", 5,
                          "--temperature", 0, "--json")
    assert code == 0
    assert json.loads(stdout)["prompt"] == "abc"


def test_bos_option_reaches_calibration_and_eval(capsys, tmp_path, tiny_llama, bos_tokenizer, text_file):
    """A tokenizer that adds BOS (Gemma-style): prune records BOS-led calibration; eval scores BOS-led windows
    unless --bos never."""
    folder = tmp_path / "gemma-style"
    tiny_llama.resize_token_embeddings(130)
    tiny_llama.save_pretrained(folder)
    bos_tokenizer.save_pretrained(folder)
    for bos, expected in [("auto", 129), ("never", None)]:
        out = tmp_path / f"out-{bos}"
        code, _, _ = run(capsys, "prune", folder, "--method", "wanda", "--calib", text_file, "--nsamples", 2,
                         "--seqlen", 16, "--out", out, "--quiet", "--bos", bos)
        assert code == 0
        calibration = json.loads((out / "sparsity.json").read_text())["calibration"]
        assert calibration["bos"] == bos and calibration["bos_token_id"] == expected
        code, stdout, _ = run(capsys, "eval", folder, "--data", text_file, "--seqlen", 32, "--json", "--quiet",
                              "--bos", bos)
        assert code == 0 and json.loads(stdout)["bos_token_id"] == expected


@pytest.mark.parametrize("extra, words", [
    (["--sparsity", "1.5"], "outside [0, 1)"),
    (["--sparsity", "4:4"], "0 < N < M"),
    (["--sparsity", "3:7"], "not divisible by M=7"),
    (["--method", "wanda", "--wbits", "4"], "--wbits is not an option of the chosen steps (method wanda)"),
    (["--override", "nonsense"], "GLOB=PATTERN"),
    (["--calib", "nosuchcorpus"], "nosuchcorpus"),
    (["--bos", "always"], "--bos always: this tokenizer has no BOS token"),
])
def test_bad_arguments_fail_clearly_and_write_nothing(capsys, tmp_path, tiny_folder, extra, words):
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "prune", tiny_folder, "--nsamples", 2, "--seqlen", 16, "--out", out,
                               "--quiet", *extra)
    assert code == 2
    assert words in stderr and "Traceback" not in stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temporary folder left behind


def test_existing_out_is_refused_before_any_work(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, _, stderr = run(capsys, "prune", tiny_folder, "--calib", text_file, "--nsamples", 2, "--seqlen", 16,
                          "--out", out, "--quiet")
    assert code == 2 and "--overwrite" in stderr
    assert (out / "config.json").read_text() == "{}"
    code, _, _ = run(capsys, "prune", tiny_folder, "--calib", text_file, "--nsamples", 2, "--seqlen", 16,
                     "--out", out, "--quiet", "--overwrite")
    assert code == 0 and (out / "sparsity.json").is_file()


def test_unknown_model(capsys, tmp_path):
    code, _, stderr = run(capsys, "eval", tmp_path / "missing-model", "--quiet")
    assert code == 2 and "missing-model" in stderr


def test_interrupted_prune_resumes_and_cleans_up(capsys, tmp_path, tiny_folder, text_file, monkeypatch,
                                                 interrupt_at):
    from sparsekern.prune.wanda import Wanda

    out = tmp_path / "out"
    argv = ["prune", tiny_folder, "--method", "wanda", "--calib", text_file, "--nsamples", 2, "--seqlen", 16,
            "--out", out, "--quiet"]
    original = interrupt_at(Wanda, "model.layers.1.")
    code, _, stderr = run(capsys, *argv)
    assert code == 130 and not out.exists()
    assert "interrupted after layer 0; rerun the same command to resume" in stderr
    assert (tmp_path / "out.partial" / "manifest.json").is_file() and not (tmp_path / "out.lock").exists()
    monkeypatch.setattr(Wanda, "prune_linear", original)
    code, _, stderr = run(capsys, *argv)
    assert code == 0 and "resuming" in stderr and "1 of 2 layers" in stderr
    assert (out / "sparsity.json").is_file() and not (tmp_path / "out.partial").exists()


def test_blocksize_not_multiple_of_m_is_refused_before_work(capsys, tmp_path, tiny_folder, text_file):
    code, _, stderr = run(capsys, "prune", tiny_folder, "--method", "sparsegpt", "--sparsity", "4:8", "--blocksize", "12",
                          "--calib",
                          text_file, "--nsamples", 2, "--seqlen", 16, "--out", tmp_path / "o", "--quiet")
    assert code == 2 and "model.layers.0.self_attn.q_proj" in stderr and "--blocksize 12" in stderr


def test_interrupt_hint_names_the_partial_folder_even_with_a_trailing_slash(capsys, tmp_path, tiny_folder,
                                                                            text_file, interrupt_at):
    from sparsekern.prune.wanda import Wanda

    interrupt_at(Wanda, "model.layers.1.")
    code, _, stderr = run(capsys, "prune", tiny_folder, "--method", "wanda", "--calib", text_file, "--nsamples", 2,
                          "--seqlen", 16, "--quiet", "--out", f"{tmp_path / 'out'}/")
    assert code == 130
    assert f"finished layers are kept in {tmp_path / 'out.partial'}" in stderr, stderr
    assert (tmp_path / "out.partial").is_dir() and not (tmp_path / "out.lock").exists()
