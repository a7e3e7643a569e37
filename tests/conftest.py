"""Shared test set-up. The environment comes first: Triton decides interpreter vs compiled when a kernel
is decorated, so the backend variables must be set before any sparsekern module is imported.

Tests of algorithms and the driver run on the ``torch`` reference backend (fast on CPU); kernel tests ask for
the ``interpret`` fixture, which runs the same Triton kernels that a GPU compiles, on CPU tensors."""

import os

os.environ.setdefault("SPARSEKERN_BACKEND", "torch")
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never touch the network: hub lookups must fail fast instead of hanging or downloading.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# CI machines have 2 cores; more threads only oversubscribe. `make test` runs two pytest-xdist workers, one core
# each.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


# The longest files run first, so that with pytest-xdist (`make test` runs two workers, a file each at a time)
# they do not start last and leave one worker idle at the end.
LONG_FILES = ("test_gemma.py", "test_smollm2.py", "test_gpu_check.py", "test_native.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in LONG_FILES)  # stable: the order within a file is kept
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def interpret():
    """Route the public ops to the Triton kernels, run by the interpreter on CPU tensors."""
    import sparsekern

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernels are compiled in this run (TRITON_INTERPRET is not 1): interpreter tests skipped")

    previous = sparsekern.get_backend()
    sparsekern.set_backend("interpret")
    yield
    sparsekern.set_backend(previous)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN / 0x7F bytes, so an element a kernel never writes fails the comparison."""
    from sparsekern.triton_kernels import _outputs

    monkeypatch.setattr(_outputs, "POISON", True)


@pytest.fixture(scope="session")
def smollm2_path():
    """Local folder of the converted SmolLM2-135M (converted on first use, ~25 s; `make setup` does it)."""
    return _alias_folder("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path():
    """Local folder of the converted Gemma-3-270M (converted on first use, ~2 min; `make test-all` installs its
    package)."""
    return _alias_folder("gemma3-270m")


def _alias_folder(alias: str):
    from sparsekern.models import ModelPackageMissing, resolve_model

    try:
        return resolve_model(alias)
    except ModelPackageMissing as exc:
        pytest.skip(f"{alias} weights unavailable: {exc}")
    except ImportError as exc:  # e.g. the gguf package is missing, so the GGUF cannot be converted
        pytest.skip(f"{alias} cannot be converted here: {exc}")


@pytest.fixture(scope="session")
def lee_available():
    """Path of the cached Lee corpus; skips the test when it was never fetched (`make setup` fetches it)."""
    from sparsekern.data import lee_path

    path = lee_path()
    if not path.is_file():
        pytest.skip(f"Lee corpus not fetched ({path}); run `python -m sparsekern.data fetch lee`")
    return path


def _make_char_tokenizer(model_max_length: int = 64, bos: bool = False):
    """A Hugging Face fast tokenizer built offline: one token per ASCII character (id = code point),
    anything else -> [UNK] (id 128). model_max_length is small on purpose, to exercise long inputs.
    bos=True: like Gemma's and Llama's, it starts every text with its BOS token "<bos>" (id 129)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(128)}
    vocab["[UNK]"] = 128
    if bos:
        vocab["<bos>"] = 129
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 129)])
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<bos>",
                                       model_max_length=model_max_length)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", model_max_length=model_max_length)


def _make_tiny_llama(vocab_size: int = 129, seed: int = 0):
    """A 2-layer random Llama small enough to run in milliseconds, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def char_tokenizer():
    return _make_char_tokenizer()


@pytest.fixture
def bos_tokenizer():
    """A character tokenizer that adds a BOS token to every text, as Gemma's does."""
    return _make_char_tokenizer(bos=True)


@pytest.fixture
def tiny_llama():
    return _make_tiny_llama()


@pytest.fixture
def tiny_folder(tmp_path, tiny_llama, char_tokenizer):
    """The tiny Llama and the character tokenizer saved as a Hugging Face folder (what the CLI takes)."""
    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path):
    """A small local calibration text (what --calib PATH takes)."""
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


@pytest.fixture
def interrupt_at(monkeypatch):
    """interrupt_at(MethodClass, "model.layers.1."): pruning any linear under that prefix raises
    KeyboardInterrupt, as a user's Ctrl-C would. Returns the method's original prune_linear."""

    def install(method_cls, prefix):
        original = method_cls.prune_linear

        def interrupted(self, weight, prepared, pattern, where):
            if where.startswith(prefix):
                raise KeyboardInterrupt
            return original(self, weight, prepared, pattern, where)

        monkeypatch.setattr(method_cls, "prune_linear", interrupted)
        return original

    return install
