"""Layer streaming (``sparsekern.streaming``): a safetensors checkpoint pruned one decoder layer in memory at a time
gives the in-memory path's weights, in an ordinary sharded checkpoint; host memory does not grow with depth; a killed
run resumes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from checks import run_cli as run
from conftest import _make_char_tokenizer

import sparsekern
from sparsekern.prune.sparsegpt import SparseGPT
from sparsekern.streaming import INDEX, prune_checkpoint


def _config(arch: str, layers: int = 2):
    small = dict(vocab_size=129, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**small)  # untied head
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**small, tie_word_embeddings=True)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(**small, head_dim=8, sliding_window=8, layer_types=["sliding_attention",
                                                                                     "full_attention"] * (layers // 2))
    raise ValueError(arch)


def _save(folder: Path, arch: str, shard: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch)).eval()
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    _make_char_tokenizer().save_pretrained(folder)
    return folder


def _ids():
    return torch.randint(0, 129, (4, 16), generator=torch.Generator().manual_seed(1))


# (arch, sharded source): llama from a sharded checkpoint (20 KB shards) with its own head, qwen2 and gemma3 from
# one model.safetensors with tied embeddings (gemma3: sliding and full attention layers, embedding scale buffer)
CASES = [("llama", "20KB"), ("qwen2", None), ("gemma3", None)]


@pytest.mark.parametrize("arch, shard", CASES)
def test_streamed_equals_in_memory(tmp_path, arch, shard):
    from transformers import AutoModelForCausalLM

    source = _save(tmp_path / "src", arch, shard)
    assert (source / INDEX).is_file() == (shard is not None)
    methods = [("wanda", "0.5"), ("magnitude", "2:4"), ("sparsegpt", "0.5")] + \
              ([("ria", "2:4")] if arch == "llama" else [])
    for method, sparsity in methods:
        options = dict(method=method, sparsity=sparsity, calib=_ids(), batch_size=2, progress=False, device="cpu")
        expected = AutoModelForCausalLM.from_pretrained(source).eval()
        report = sparsekern.prune(expected, **options)
        out = tmp_path / f"out-{method}"
        streamed_report = prune_checkpoint(source, out, **options)
        got, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info  # nothing missing, unexpected or mismatched
        assert (got.lm_head.weight is got.get_input_embeddings().weight) == bool(expected.config.tie_word_embeddings)
        index = json.loads((out / INDEX).read_text())
        assert len(set(index["weight_map"].values())) == expected.config.num_hidden_layers + 1
        assert {"config.json", "tokenizer.json", "sparsity.json"} <= {p.name for p in out.iterdir()}
        assert ((out / "generation_config.json").is_file() == (source / "generation_config.json").is_file())
        exact = method != "sparsegpt"
        for (name, a), b in zip(expected.state_dict().items(), got.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5, msg=name)
            if exact or a.dim() == 2:
                assert torch.equal(a == 0, b == 0), name  # the same masks
        assert [r.sparsity for r in streamed_report.linears] == [r.sparsity for r in report.linears]
        record = json.loads((out / "sparsity.json").read_text())
        assert record["method"] == method and len(record["layers"]) == len(report.linears)


def test_cli_streams_by_default_and_no_stream_loads_in_memory(capsys, tmp_path, text_file):
    source = _save(tmp_path / "src", "llama")
    common = ["--method", "wanda", "--sparsity", "2:4", "--permute", "--calib", text_file, "--nsamples", 4,
              "--seqlen", 16, "--quiet", "--json"]
    code, stdout, _ = run(capsys, "prune", source, *common, "--out", tmp_path / "streamed")
    assert code == 0 and json.loads(stdout)["streamed"] is True
    code, stdout, _ = run(capsys, "prune", source, *common, "--out", tmp_path / "memory", "--no-stream")
    assert code == 0 and json.loads(stdout)["streamed"] is False
    assert (tmp_path / "streamed" / INDEX).is_file() and (tmp_path / "streamed" / "permutations.safetensors").is_file()
    from safetensors.torch import load_file

    assert {k: v.tolist() for k, v in load_file(tmp_path / "streamed" / "permutations.safetensors").items()} == \
           {k: v.tolist() for k, v in load_file(tmp_path / "memory" / "permutations.safetensors").items()}
    assert not (tmp_path / "streamed.partial").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch or temporary folder left


def test_allocation_needing_dense_passes_is_refused_streamed(capsys, tmp_path, text_file):
    source = _save(tmp_path / "src", "llama")
    code, _, stderr = run(capsys, "prune", source, "--method", "wanda", "--allocation", "owl", "--calib", text_file,
                          "--nsamples", 2, "--seqlen", 16, "--quiet", "--out", tmp_path / "o")
    assert code == 2 and "--allocation owl" in stderr and "--no-stream" in stderr
    assert not (tmp_path / "o").exists()


def test_a_killed_streamed_run_resumes_and_gives_the_same_checkpoint(capsys, tmp_path, text_file, interrupt_at,
                                                                      monkeypatch):
    source = _save(tmp_path / "src", "qwen2")
    common = ["--method", "sparsegpt", "--sparsity", "2:4", "--calib", text_file, "--nsamples", 4, "--seqlen", 16,
              "--batch-size", 2, "--quiet"]
    assert run(capsys, "prune", source, *common, "--out", tmp_path / "reference")[0] == 0
    original = interrupt_at(SparseGPT, "model.layers.1.")
    code, _, stderr = run(capsys, "prune", source, *common, "--out", tmp_path / "out")
    assert code == 130 and "interrupted after layer 0" in stderr
    manifest = json.loads((tmp_path / "out.partial" / "manifest.json").read_text())
    assert manifest["completed_layers"] == 1 and not (tmp_path / "out").exists()
    calls = []
    monkeypatch.setattr(SparseGPT, "prune_linear", lambda self, *args: calls.append(args[-1]) or original(self, *args))
    assert run(capsys, "prune", source, *common, "--out", tmp_path / "out")[0] == 0
    assert calls and all(name.startswith("model.layers.1.") for name in calls)  # layer 0 was not redone
    assert not (tmp_path / "out.partial").exists()
    files = sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in files:
        if name.endswith(".safetensors") or name == INDEX:
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert _untimed(json.loads((tmp_path / "out" / "sparsity.json").read_text())) == \
           _untimed(json.loads((tmp_path / "reference" / "sparsity.json").read_text()))


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k != "time_s"}
    return [_untimed(v) for v in value] if isinstance(value, list) else value


_MEASURE = textwrap.dedent("""
    import json, os
    from sparsekern.cli import main
    source, out, stream = os.environ["SK_ARGS"].split("|")
    code = main(["prune", source, "--method", "wanda", "--nsamples", "2", "--seqlen", "16", "--batch-size", "2",
                 "--calib", os.environ["SK_CALIB"], "--device", "cpu", "--quiet", "--no-resume", "--out", out]
                + ([] if stream == "1" else ["--no-stream"]))
    assert code == 0
    # VmHWM, not getrusage's ru_maxrss: that one starts from the parent's resident size at fork (Linux keeps the
    # larger across exec), and the test process holds the deep model it just wrote.
    hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
    print(json.dumps({"maxrss_mib": hwm / 1024}))
""")


def _peak_rss(source: Path, out: Path, stream: bool, calib: Path) -> float:
    env = {**os.environ, "SK_ARGS": f"{source}|{out}|{int(stream)}", "SK_CALIB": str(calib),
           "SPARSEKERN_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["maxrss_mib"]


def test_streamed_peak_memory_does_not_grow_with_depth(tmp_path, text_file):
    """4 vs 64 decoder layers of 4 MiB each (fp32, hidden 256, intermediate 1024): the streamed run's peak RSS
    stays within 1.3x; the in-memory run of the deep model needs far more (its 256 MiB of weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsekern.models import parameters_on_meta

    peaks = {}
    for layers in (4, 64):
        config = LlamaConfig(vocab_size=129, hidden_size=256, intermediate_size=1024, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
        with parameters_on_meta():  # random weights written shard by shard: the test process stays small
            model = LlamaForCausalLM(config)
        state = {name: torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) * 0.02
                 for i, (name, t) in enumerate(model.state_dict().items())}
        model.load_state_dict(state, assign=True)
        model.save_pretrained(tmp_path / f"src{layers}", max_shard_size="50MB")
        del model, state
        _make_char_tokenizer().save_pretrained(tmp_path / f"src{layers}")
        peaks[layers] = _peak_rss(tmp_path / f"src{layers}", tmp_path / f"out{layers}", True, text_file)
    in_memory = _peak_rss(tmp_path / "src64", tmp_path / "out64-memory", False, text_file)
    print(f"peak RSS MiB: streamed 4 layers {peaks[4]:.0f}, 64 layers {peaks[64]:.0f}; in memory 64 layers "
          f"{in_memory:.0f}")
    assert peaks[64] <= 1.3 * peaks[4], peaks
    assert in_memory > 1.3 * peaks[4], (in_memory, peaks)  # the bound above means something
