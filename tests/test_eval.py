import math

import pytest
import torch
import torch.nn.functional as F

from sparsekern.eval import perplexity


def _stream(n_tokens: int, vocab: int = 129) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(0))


def _manual_nll(model, ids: torch.Tensor, seqlen: int) -> float:
    """Mean NLL per predicted token, one window at a time with log_softmax + gather (no cross_entropy)."""
    total, count = 0.0, 0
    for start in range(0, ids.shape[1] - seqlen + 1, seqlen):
        window = ids[:, start : start + seqlen]
        with torch.no_grad():
            logp = F.log_softmax(model(window).logits[0, :-1].double(), dim=-1)
        total -= logp.gather(1, window[0, 1:, None]).sum().item()
        count += seqlen - 1
    return total / count


def test_matches_manual_computation(tiny_llama):
    ids = _stream(100)  # 6 windows of 16, tail of 4 dropped; batches of 4 leave a partial last batch
    result = perplexity(tiny_llama, ids, seqlen=16, batch_size=4, progress=False)
    expected = _manual_nll(tiny_llama, ids[:, :96], seqlen=16)
    assert result["windows"] == 6 and result["tokens"] == 6 * 15
    assert result["nll"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_batch_size_does_not_change_result(tiny_llama):
    ids = _stream(64)
    one = perplexity(tiny_llama, ids, seqlen=16, batch_size=1, progress=False)
    many = perplexity(tiny_llama, ids, seqlen=16, batch_size=8, progress=False)
    assert one["nll"] == pytest.approx(many["nll"], rel=1e-5)


def test_window_count_and_max_windows(tiny_llama):
    ids = _stream(50)
    assert perplexity(tiny_llama, ids, seqlen=10, progress=False)["windows"] == 5
    capped = perplexity(tiny_llama, ids, seqlen=10, max_windows=2, progress=False)
    assert (capped["windows"], capped["tokens"]) == (2, 18)
    assert capped["nll"] == pytest.approx(_manual_nll(tiny_llama, ids[:, :20], seqlen=10), rel=1e-5)
    assert perplexity(tiny_llama, ids[0], seqlen=10, progress=False)["windows"] == 5  # 1-D accepted


def test_short_text_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match=r"15 tokens, fewer than the 16 needed for one window of seqlen=16"):
        perplexity(tiny_llama, _stream(15), seqlen=16, progress=False)


def test_rejects_batched_input(tiny_llama):
    with pytest.raises(ValueError, match=r"shape \[1, T\]"):
        perplexity(tiny_llama, torch.zeros(2, 32, dtype=torch.long), seqlen=16, progress=False)


def test_restores_training_mode(tiny_llama):
    tiny_llama.train()
    perplexity(tiny_llama, _stream(32), seqlen=16, progress=False)
    assert tiny_llama.training


def test_progress_bar_on_stderr(tiny_llama, capsys):
    perplexity(tiny_llama, _stream(32), seqlen=16, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "perplexity" in err
    perplexity(tiny_llama, _stream(32), seqlen=16, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_smollm2_perplexity_on_lee_is_sane(smollm2_path, lee_available):
    from sparsekern.data import eval_tokens
    from sparsekern.models import load_model

    model, tokenizer = load_model(smollm2_path)
    result = perplexity(model, eval_tokens(tokenizer, "lee", "test"), seqlen=512, max_windows=4, progress=False)
    assert result["windows"] == 4
    assert 3 < result["perplexity"] < 60  # a working 135M model on news text; random would be ~49k


def test_bos_led_windows_score_every_stream_token(tiny_llama):
    """With a BOS each window is BOS + seqlen - 1 stream tokens, all predicted; the count per window is unchanged."""
    stream = _stream(100, vocab=128)
    bos = 128
    result = perplexity(tiny_llama, stream, seqlen=16, batch_size=4, progress=False, bos_token_id=bos)
    assert result["windows"] == 100 // 15 and result["tokens"] == 6 * 15
    total = 0.0
    for start in range(0, 90, 15):
        window = torch.cat([torch.tensor([[bos]]), stream[:, start : start + 15]], dim=1)
        with torch.no_grad():
            logp = F.log_softmax(tiny_llama(window).logits[0, :-1].double(), dim=-1)
        total -= logp.gather(1, window[0, 1:, None]).sum().item()
    assert result["nll"] == pytest.approx(total / 90, rel=1e-5)
    with pytest.raises(ValueError, match="fewer than the 15 needed"):
        perplexity(tiny_llama, _stream(14), seqlen=16, progress=False, bos_token_id=bos)
