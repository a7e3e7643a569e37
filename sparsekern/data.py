"""Calibration and evaluation text.

Sources (the ``source`` argument everywhere):

* ``"lee"`` (default): the Lee news corpus (300 short news articles, ~76k SmolLM2 tokens), taken from
  the ``gensim==4.4.0`` wheel on PyPI, so it needs no dataset hub. Fetched once into
  ``cache_dir()/data`` by ``make setup`` or ``python -m sparsekern.data fetch lee``; never downloaded
  at run time. Split by document: ``"train"`` is the first 85% of the articles, ``"test"`` the rest.
* ``"wikitext2"``, ``"c4"``, ``"ptb"``: the usual pruning-paper datasets through ``datasets``
  (``pip install 'sparsekern[eval]'``). Untested here: this project's machines cannot reach the hub.
* a local ``.txt`` file (used whole, for both splits) or ``.jsonl`` file (one document per line, in
  field ``"text"``; also used whole for both splits).

Documents are joined with ``"\\n\\n"``.

Windows start the way the model's training sequences did (``bos``, see :func:`window_bos`): for a tokenizer that
adds a BOS token (Gemma, Llama 2/3, Mistral...), every calibration and evaluation window starts with it and the
rest is cut from the stream tokenized without special tokens; a model such as Gemma produces out-of-distribution
activations on windows that start mid-stream without it. ``bos="never"`` cuts windows from the stream as the
tokenizer makes it (BOS at the very start only): the published SparseGPT/Wanda wikitext2 protocol, for comparisons.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from sparsekern.models import cache_dir

__all__ = [
    "SOURCES",
    "SPLITS",
    "lee_path",
    "fetch_lee",
    "load_text",
    "calibration_windows",
    "eval_tokens",
    "window_bos",
    "BOS_CHOICES",
]

SPLITS = ("train", "test")
BOS_CHOICES = ("auto", "always", "never")
# Calibration windows covering the text more than this many times over get a warning.
OVERLAP_WARNING = 8
HF_SOURCES = ("wikitext2", "c4", "ptb")
SOURCES = ("lee",) + HF_SOURCES
LOCAL_SUFFIXES = (".txt", ".jsonl")

LEE_FILE = "lee_background.cor"
LEE_WHEEL = "gensim==4.4.0"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
LEE_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
LEE_TRAIN_FRACTION = 0.85

# The corpus is the same in every gensim wheel; pinning one platform's wheel makes the download work
# (and identical) from any host, and never falls back to building gensim's sdist.
_LEE_PIP_PLATFORM = ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                     "--python-version", "3.11", "--implementation", "cp"]

# C4's first shards, as used by SparseGPT and Wanda; capped so tokenizing stays cheap.
_C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "test": "en/c4-validation.00000-of-00008.json.gz"}
_C4_MAX_DOCS = {"train": 20000, "test": 1100}


def lee_path() -> Path:
    """Where the Lee corpus lives once fetched."""
    return cache_dir() / "data" / LEE_FILE


def fetch_lee(force: bool = False) -> Path:
    """Download the gensim wheel with pip and extract the Lee corpus into the cache (atomically)."""
    dest = lee_path()
    if dest.is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sparsekern-lee-") as tmp:
        wheel = _pip_download(LEE_WHEEL, Path(tmp))
        _extract_member(wheel, LEE_MEMBER, LEE_SHA256, dest)
    return dest


def _pip_download(spec: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *_LEE_PIP_PLATFORM, spec, "-d", str(into)]
    result = subprocess.run(cmd, stdout=sys.stderr)  # pip's progress goes to the user's terminal
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download {spec} from PyPI (command: {' '.join(cmd)}; pip's output is above). "
            "The Lee corpus needs network access to PyPI once."
        )
    return wheels[0]


def _extract_member(archive: Path, member: str, sha256: str, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        data = zf.read(member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise RuntimeError(f"{member} in {archive.name} has sha256 {digest}, expected {sha256}; not using it")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _lee_documents() -> list[str]:
    path = lee_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"the Lee corpus is not in the cache ({path}): run `make setup` or "
            "`python -m sparsekern.data fetch lee` once (needs PyPI access)"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def check_source(source: str) -> None:
    """Fail now, with the reason, if ``source`` cannot give text: an unknown name, the Lee corpus not fetched, a
    local file missing, empty or not UTF-8 (read once here), ``datasets`` missing for a hub dataset."""
    if source == "lee":
        _lee_documents()
    elif source in HF_SOURCES:
        if importlib.util.find_spec("datasets") is None:
            raise ImportError(f"text source {source!r} needs the `datasets` package: pip install 'sparsekern[eval]'")
    elif not load_text(source).strip():
        raise ValueError(f"text file {source} is empty: calibration needs text")


def load_text(source: str = "lee", split: str = "train") -> str:
    """The text of ``split`` (``"train"`` or ``"test"``) of ``source``; documents joined by blank lines."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if source == "lee":
        docs = _lee_documents()
        n_train = int(len(docs) * LEE_TRAIN_FRACTION)
        return "\n\n".join(docs[:n_train] if split == "train" else docs[n_train:])
    if source in HF_SOURCES:
        return "\n\n".join(_hf_documents(source, split))
    path = Path(source).expanduser()
    if path.suffix in LOCAL_SUFFIXES:
        return _local_text(path)
    raise ValueError(
        f"unknown text source {source!r}; use one of {', '.join(SOURCES)}, "
        f"or a path to a local file ending in {' or '.join(LOCAL_SUFFIXES)}"
    )


def _local_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    try:
        return _read_local(path)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): pass a UTF-8 .txt or "
                         ".jsonl file") from None


def _read_local(path: Path) -> str:
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8")
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                docs.append(record["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}:{lineno}: each line must be a JSON object with a string field \"text\" ({exc!r})"
                ) from exc
            if not isinstance(docs[-1], str):
                raise ValueError(f"{path}:{lineno}: field \"text\" must be a string, got {type(docs[-1]).__name__}")
    return "\n\n".join(docs)


def _hf_documents(source: str, split: str) -> list[str]:
    """Documents of a hub dataset. Untested offline: this project's machines cannot reach the hub."""
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise ImportError(
            f"text source {source!r} needs the `datasets` package: pip install 'sparsekern[eval]'"
        ) from exc

    if source == "wikitext2":
        ds = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
        return list(ds["text"])
    if source == "c4":
        hf_split = "train" if split == "train" else "validation"
        ds = load_dataset("allenai/c4", data_files={hf_split: _C4_FILES[split]}, split=hf_split)
        return list(ds.select(range(min(len(ds), _C4_MAX_DOCS[split])))["text"])
    if source == "ptb":
        try:
            ds = load_dataset("ptb-text-only/ptb_text_only", "penn_treebank", split=split)
        except Exception:
            # datasets>=4 runs no loading scripts; the hub keeps an auto-converted parquet copy.
            ds = load_dataset("ptb-text-only/ptb_text_only", "penn_treebank", split=split,
                              revision="refs/convert/parquet")
        return list(ds["sentence"])
    raise AssertionError(source)


def window_bos(tokenizer, bos: str = "auto") -> int | None:
    """The token id every window starts with, or None.

    ``"auto"``: the tokenizer's BOS when the tokenizer itself adds one to a text (Gemma, Llama...), else None (GPT-2
    style tokenizers such as SmolLM2's add none); ``"always"``: its BOS token, which it must have; ``"never"``: None.
    """
    if bos not in BOS_CHOICES:
        raise ValueError(f"--bos {bos!r} is not one of {', '.join(BOS_CHOICES)}")
    if bos == "never":
        return None
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos == "always":
        if bos_id is None:
            raise ValueError("--bos always: this tokenizer has no BOS token; use --bos auto or --bos never")
        return int(bos_id)
    if bos_id is None:
        return None
    ids = tokenizer("a", verbose=False).input_ids
    return int(bos_id) if ids and ids[0] == bos_id else None


def _tokenize(tokenizer, text: str, special_tokens: bool = True) -> torch.Tensor:
    # verbose=False: a whole corpus is longer than model_max_length on purpose; we cut windows ourselves.
    return tokenizer(text, return_tensors="pt", verbose=False, add_special_tokens=special_tokens).input_ids[0]


def _stream(tokenizer, source: str, split: str, bos_id: int | None) -> torch.Tensor:
    """The split's token stream: without special tokens when each window gets its own BOS, else as the tokenizer
    makes it (the published protocol)."""
    return _tokenize(tokenizer, load_text(source, split), special_tokens=bos_id is None).long()


def calibration_windows(
    tokenizer,
    source: str = "lee",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    bos: str = "auto",
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from the train split: LongTensor [nsamples, seqlen].

    With a BOS (:func:`window_bos`) each window is that token followed by ``seqlen - 1`` consecutive tokens of the
    stream. Window starts come from a ``torch.Generator`` seeded with ``seed`` (same seed, same windows); windows
    may overlap.
    """
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
    bos_id = window_bos(tokenizer, bos)
    if bos_id is not None and seqlen < 2:
        raise ValueError(f"seqlen {seqlen} leaves no room for text after the BOS token; use --seqlen 2 or more")
    ids = _stream(tokenizer, source, "train", bos_id)
    content = seqlen - (bos_id is not None)
    n_tokens = ids.numel()
    if n_tokens < content + 1:
        raise ValueError(
            f"the train split of {source!r} has {n_tokens} tokens, fewer than the {content + 1} needed for one "
            "calibration window; lower --seqlen or use a larger text source"
        )
    if nsamples * content > OVERLAP_WARNING * n_tokens:
        warnings.warn(f"{nsamples} calibration windows of {seqlen} tokens from a text of {n_tokens} tokens use each "
                      f"token about {nsamples * content / n_tokens:.0f} times: the calibration statistics see little "
                      "variety; use a larger text (--calib) or fewer windows (--nsamples)", stacklevel=2)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - content, (nsamples,), generator=gen)
    windows = torch.stack([ids[s : s + content] for s in starts.tolist()])
    if bos_id is not None:
        windows = torch.cat([torch.full((nsamples, 1), bos_id, dtype=torch.long), windows], dim=1)
    return windows


def eval_tokens(tokenizer, source: str = "lee", split: str = "test", bos: str = "auto") -> torch.Tensor:
    """The whole ``split`` of ``source`` tokenized: LongTensor [1, T].

    Pass ``window_bos(tokenizer, bos)`` as ``perplexity(..., bos_token_id=)``: with a BOS the stream holds no
    special tokens and perplexity starts every window with it; without one it is the tokenizer's own stream."""
    return _stream(tokenizer, source, split, window_bos(tokenizer, bos)).unsqueeze(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekern.data")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download a built-in corpus into the cache (once)")
    fetch.add_argument("name", choices=["lee"])
    fetch.add_argument("--force", action="store_true", help="download again even if cached")
    args = parser.parse_args(argv)
    try:
        print(fetch_lee(force=args.force))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
