import hashlib
import json
import sys
import zipfile

import pytest
import torch

from sparsekern import data
from sparsekern.data import calibration_windows, eval_tokens, load_text, window_bos

TEXT = "".join(f"Sentence number {i} talks about pruning weights. " for i in range(60))  # ~3k chars


@pytest.fixture
def txt_source(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def _find(window: torch.Tensor, stream: torch.Tensor) -> bool:
    n = window.numel()
    return any(torch.equal(stream[s : s + n], window) for s in range(stream.numel() - n + 1))


def test_windows_shape_and_contiguity(char_tokenizer, txt_source):
    windows = calibration_windows(char_tokenizer, txt_source, nsamples=5, seqlen=100, seed=0)
    assert windows.shape == (5, 100) and windows.dtype == torch.long
    stream = eval_tokens(char_tokenizer, txt_source)[0]
    assert all(_find(w, stream) for w in windows)  # each window is a contiguous slice of the text


def test_windows_seeded_and_deterministic(char_tokenizer, txt_source):
    a = calibration_windows(char_tokenizer, txt_source, nsamples=8, seqlen=64, seed=0)
    b = calibration_windows(char_tokenizer, txt_source, nsamples=8, seqlen=64, seed=0)
    c = calibration_windows(char_tokenizer, txt_source, nsamples=8, seqlen=64, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_windows_need_seqlen_plus_one_tokens(char_tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    calibration_windows(char_tokenizer, str(path), nsamples=2, seqlen=99)
    with pytest.raises(ValueError, match=r"100 tokens.*the 101 needed"):
        calibration_windows(char_tokenizer, str(path), nsamples=2, seqlen=100)


def test_long_text_does_not_warn_about_max_length(char_tokenizer, txt_source, caplog):
    assert char_tokenizer.model_max_length < len(TEXT)
    eval_tokens(char_tokenizer, txt_source)
    assert "longer than the specified maximum" not in caplog.text


def test_txt_is_whole_file_for_both_splits(txt_source):
    assert load_text(txt_source, "train") == load_text(txt_source, "test") == TEXT


def test_jsonl_documents_joined(tmp_path, char_tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["first doc", "second"])) + "\n\n")
    assert load_text(str(path), "train") == "first doc\n\nsecond"
    assert eval_tokens(char_tokenizer, str(path), "test").shape == (1, len("first doc\n\nsecond"))


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: .*\"text\""):
        load_text(str(path), "train")


def test_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text(str(tmp_path / "nope.txt"), "train")


def test_unknown_source_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        load_text("imagenet", "train")
    assert all(name in str(err.value) for name in ("'imagenet'", "lee", "wikitext2", "c4", "ptb", ".jsonl"))


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_text("lee", "validation")


def test_hub_sources_need_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"sparsekern\[eval\]"):
        load_text("wikitext2", "test")


def test_lee_missing_says_how_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEKERN_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"make setup.*python -m sparsekern\.data fetch lee"):
        load_text("lee", "train")


def test_lee_split_by_document(lee_available, char_tokenizer):
    train, test = load_text("lee", "train"), load_text("lee", "test")
    train_docs, test_docs = train.split("\n\n"), test.split("\n\n")
    assert (len(train_docs), len(test_docs)) == (255, 45)  # 85% of the 300 articles for calibration
    assert not set(train_docs) & set(test_docs)
    assert train_docs[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert load_text("lee", "train") == train  # deterministic
    windows = calibration_windows(char_tokenizer, "lee", nsamples=4, seqlen=256, seed=3)
    assert windows.shape == (4, 256)


def test_fetch_lee_extracts_verified_file_atomically(monkeypatch, tmp_path):
    """fetch_lee end to end, with pip replaced by a fake wheel (no network in tests)."""
    monkeypatch.setenv("SPARSEKERN_CACHE", str(tmp_path / "cache"))
    payload = b"doc one\ndoc two\n"

    def fake_pip_download(spec, into):
        assert spec == "gensim==4.4.0"
        wheel = into / "gensim-4.4.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(data.LEE_MEMBER, payload)
            zf.writestr("gensim/__init__.py", "")
        return wheel

    monkeypatch.setattr(data, "_pip_download", fake_pip_download)
    monkeypatch.setattr(data, "LEE_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256"):
        data.fetch_lee()
    assert list((tmp_path / "cache" / "data").iterdir()) == []  # nothing half-written

    monkeypatch.setattr(data, "LEE_SHA256", hashlib.sha256(payload).hexdigest())
    path = data.fetch_lee()
    assert path == data.lee_path() and path.read_bytes() == payload
    assert load_text("lee", "train") == "doc one"  # int(2 * 0.85) = 1 document for training


# -- windows that start like the model's sequences (BOS) -------------------------------------------------------


def test_bos_is_detected_from_what_the_tokenizer_does(char_tokenizer, bos_tokenizer):
    assert bos_tokenizer("ab").input_ids == [129, 97, 98]  # the Gemma-style fixture adds its BOS
    assert window_bos(bos_tokenizer) == window_bos(bos_tokenizer, "always") == 129
    assert window_bos(bos_tokenizer, "never") is None
    assert window_bos(char_tokenizer) is None and window_bos(char_tokenizer, "never") is None
    with pytest.raises(ValueError, match="--bos always: this tokenizer has no BOS token"):
        window_bos(char_tokenizer, "always")
    with pytest.raises(ValueError, match="--bos 'sometimes' is not one of auto, always, never"):
        window_bos(char_tokenizer, "sometimes")


def test_calibration_windows_start_with_bos_and_continue_the_text(bos_tokenizer, txt_source):
    windows = calibration_windows(bos_tokenizer, txt_source, nsamples=6, seqlen=50, seed=0)
    assert windows.shape == (6, 50) and (windows[:, 0] == 129).all()
    stream = eval_tokens(bos_tokenizer, txt_source)[0]
    assert 129 not in stream.tolist()  # the stream itself holds no special tokens then
    assert stream.tolist() == [ord(c) for c in TEXT]
    assert all(_find(w[1:], stream) for w in windows)


def test_bos_never_is_the_published_protocol(bos_tokenizer, txt_source):
    """Windows cut from the stream as the tokenizer makes it: its BOS at the very start of the text only."""
    stream = eval_tokens(bos_tokenizer, txt_source, bos="never")[0]
    assert stream[0] == 129 and 129 not in stream[1:].tolist()
    windows = calibration_windows(bos_tokenizer, txt_source, nsamples=6, seqlen=50, seed=0, bos="never")
    assert all(_find(w, stream) for w in windows) and not (windows[:, 0] == 129).all()


def test_bos_always_on_a_tokenizer_that_adds_none(char_tokenizer, txt_source):
    char_tokenizer.bos_token = "\x02"  # a BOS it knows but never adds by itself
    windows = calibration_windows(char_tokenizer, txt_source, nsamples=3, seqlen=20, seed=0, bos="always")
    assert (windows[:, 0] == 2).all()
    assert torch.equal(calibration_windows(char_tokenizer, txt_source, nsamples=3, seqlen=20, seed=0),
                       calibration_windows(char_tokenizer, txt_source, nsamples=3, seqlen=20, seed=0, bos="never"))


def test_windows_reusing_the_text_many_times_warn(char_tokenizer, txt_source):
    with pytest.warns(UserWarning, match="use each token about 12 times"):
        calibration_windows(char_tokenizer, txt_source, nsamples=340, seqlen=100, seed=0)
