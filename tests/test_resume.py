"""An interrupted run resumes from the first unfinished layer and ends exactly where an uninterrupted one does."""

import pytest
import torch

import sparsekern
from sparsekern.prune.sparsegpt import SparseGPT


def fresh_model(tiny_llama):
    model = type(tiny_llama)(tiny_llama.config).eval()
    model.load_state_dict(tiny_llama.state_dict())
    return model


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_llama, tmp_path, monkeypatch, interrupt_at):
    calibration = torch.randint(0, 129, (4, 16), generator=torch.Generator().manual_seed(0))
    options = dict(method="sparsegpt", sparsity="2:4", calib=calibration, progress=False, batch_size=2)
    expected = fresh_model(tiny_llama)
    sparsekern.prune(expected, **options)

    crashed = fresh_model(tiny_llama)
    original = interrupt_at(SparseGPT, "model.layers.1.")
    with pytest.raises(KeyboardInterrupt):
        sparsekern.prune(crashed, resume_dir=str(tmp_path / "partial"), **options)
    assert (tmp_path / "partial" / "layer00000.pt").is_file()
    assert not (tmp_path / "partial" / "layer00001.pt").exists()

    resumed = fresh_model(tiny_llama)  # a new process: the model is dense again
    calls = []
    monkeypatch.setattr(SparseGPT, "prune_linear",
                        lambda self, *args: calls.append(args[-1]) or original(self, *args))
    report = sparsekern.prune(resumed, resume_dir=str(tmp_path / "partial"), **options)
    assert calls and all(name.startswith("model.layers.1.") for name in calls)  # layer 0 was not redone
    assert len(report.linears) == 2 * 7
    for (name, a), b in zip(expected.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_partial_state_of_other_settings_is_refused(tiny_llama, tmp_path):
    calibration = torch.randint(0, 129, (2, 16), generator=torch.Generator().manual_seed(0))
    sparsekern.prune(fresh_model(tiny_llama), method="wanda", sparsity="0.5", calib=calibration, progress=False,
                     resume_dir=str(tmp_path / "p"))
    with pytest.raises(ValueError, match="different settings"):
        sparsekern.prune(fresh_model(tiny_llama), method="wanda", sparsity="2:4", calib=calibration,
                         progress=False, resume_dir=str(tmp_path / "p"))
