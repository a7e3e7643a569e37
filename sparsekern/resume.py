"""Resumable pruning: after each decoder layer, its pruned weights and the next layer's inputs go to a folder.

A run that dies part-way (out of memory, preempted, Ctrl-C, SIGKILL, a full disk) restarts from the first
unfinished layer instead of from scratch. Each layer has one commit point:

1. ``layerNNNNN.safetensors`` (the layer's pruned weights) and ``hidden-NNNNN.safetensors`` (the next layer's inputs,
   in the model's dtype) are written under temporary names, fsynced, and renamed; they are new files, so a crash
   here leaves the committed state as it was;
2. ``manifest.json``, naming every file of the state with its size and sha256, the layer count, the run's
   fingerprint and the time spent so far, is written the same way and renamed over the old one (then the folder is
   fsynced): that rename is the commit. Files the manifest does not name (a previous layer's inputs, leftovers
   of a crash) are deleted after it.

Loading checks the manifest's fingerprint and every file's size and checksum, so a damaged or foreign state is
refused, never mixed in. The fingerprint covers the model's weights (sampled from every tensor), its config, the
method and its options, the pattern and the calibration ids: rerunning on another model folder with the same
config is refused too. The writes of one layer run in a background thread while the next layer computes; the
next commit, or the end of the run, waits for them and raises their error, if any.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
VERSION = 2
_SAMPLE = 1 << 16  # elements of each weight tensor that enter the fingerprint


class ResumeError(ValueError):
    """The folder holds a state this run must not continue from; the message says how to start over."""


def fingerprint(model: torch.nn.Module, calibration: torch.Tensor, settings: dict) -> str:
    """A hash of everything that determines the result of a run: the model's config and weights (a strided sample
    of up to 65536 elements of every tensor, with its name, shape and dtype), the settings, the calibration ids."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update((config.to_json_string() if hasattr(config, "to_json_string") else repr(config)).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE].cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(calibration.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def checkpoint_fingerprint(config: str, files: list[str | os.PathLike], calibration: torch.Tensor,
                           settings: dict) -> str:
    """The fingerprint of a run streamed from a safetensors checkpoint (the model is never whole in memory): the
    config, then for every tensor of every file its name, dtype, shape and a strided sample of up to 64 KiB of its
    bytes read straight from the file (never more than one block of it in memory), the settings, the calibration
    ids. A different fingerprint from :func:`fingerprint`'s on the same model: streamed and in-memory states never
    mix."""
    digest = hashlib.sha256(b"streamed\0" + config.encode())
    for path in files:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
            base = 8 + header_len
            for name in sorted(k for k in header if k != "__metadata__"):
                entry = header[name]
                begin, end = entry["data_offsets"]
                digest.update(f"{name}{tuple(entry['shape'])}{entry['dtype']}".encode())
                size = end - begin
                blocks = 1 if size <= _SAMPLE else 64
                step = max(1, size // blocks)
                for offset in range(0, size, step)[:blocks]:
                    f.seek(base + begin + offset)
                    digest.update(f.read(min(_SAMPLE // blocks, size - offset)))
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(calibration.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)


def _write_durably(path: Path, write) -> None:
    """write(tmp) into a temporary sibling, fsync it, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    _fsync(tmp)
    _replace(tmp, path)


class ResumeState:
    """The per-layer progress of one pruning run in ``folder``."""

    def __init__(self, folder: str | os.PathLike, run_fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = run_fingerprint
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._files: dict[str, dict] = {}  # the committed state's files: {name: {"bytes": n, "sha256": hex}}

    def _manifest(self) -> dict | None:
        path = self.folder / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ResumeError(f"{path} is damaged ({exc}); rerun with --restart to start over") from None
        if manifest.get("version") != VERSION or manifest.get("fingerprint") != self.fingerprint:
            raise ResumeError(
                f"{self.folder} holds a partial run of another model, settings or calibration data (or of another "
                "sparsekern version): rerun with --restart to discard it and start over, or rerun the command that "
                "made it to resume")
        return manifest

    def completed_layers(self) -> int:
        """How many layers a previous run of the same configuration finished (0 if none)."""
        manifest = self._manifest()
        return 0 if manifest is None else int(manifest["completed_layers"])

    def load(self, completed: int, device: torch.device, weights: bool = True
             ) -> tuple[list[dict[str, torch.Tensor]], list, list, float]:
        """(per-layer weights of the completed layers, the next layer's inputs on ``device``, the reports, seconds
        spent so far), after checking every file against the manifest. ``weights=False`` (streaming: the layer
        files are the output's shards, read again only when it is assembled) gives [] for the weights."""
        manifest = self._manifest()
        if manifest is None or int(manifest["completed_layers"]) != completed:
            raise ResumeError(f"{self.folder} changed while it was being read; rerun to resume")
        for name, meta in manifest["files"].items():
            path = self.folder / name
            if not path.is_file() or path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
                raise ResumeError(f"{path} is missing or damaged (it does not match {MANIFEST}); rerun with "
                                  "--restart to start over")
        self._files = dict(manifest["files"])
        layer_weights = [load_file(self.folder / _layer_file(i)) for i in range(completed)] if weights else []
        hidden_file = load_file(self.folder / _hidden_file(completed), device=str(device))
        hidden = [hidden_file[str(b)] for b in range(len(hidden_file))]
        return layer_weights, hidden, manifest["reports"], float(manifest["time_s"])

    def save(self, completed: int, weights: dict[str, torch.Tensor], hidden: list[torch.Tensor],
             reports: list[dict], time_s: float) -> None:
        """Record that layers [0, completed) are done: this layer's new weights and the next layer's inputs. GPU
        tensors are copied to the CPU now (CPU ones are kept as they are: the pipeline replaces them, never writes
        into them); the files are written in the background (see :meth:`wait`)."""
        self.wait()
        weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        hidden = {str(b): h.detach().to("cpu").contiguous() for b, h in enumerate(hidden)}
        args = (completed, weights, hidden, [dict(r) for r in reports], time_s)
        self._writer = threading.Thread(target=self._commit, args=args, name="sparsekern-resume", daemon=True)
        self._writer.start()

    def wait(self) -> None:
        """Wait for the last layer's writes; raise their error, naming the folder and the fixes."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise OSError(f"could not record progress in {self.folder} ({error}); the finished layers up to the "
                          "last recorded one are kept: free space or fix the folder and rerun the same command to "
                          "resume, or pass --no-resume") from error

    def _commit(self, completed: int, weights: dict, hidden: dict, reports: list[dict], time_s: float) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            files = dict(self._files)
            for name, tensors in [(_layer_file(completed - 1), weights), (_hidden_file(completed), hidden)]:
                _write_durably(self.folder / name,
                               lambda tmp, tensors=tensors: save_file(tensors, tmp, {"format": "pt"}))
                files[name] = {"bytes": (self.folder / name).stat().st_size, "sha256": _sha256(self.folder / name)}
            files.pop(_hidden_file(completed - 1), None)
            manifest = {"version": VERSION, "fingerprint": self.fingerprint, "completed_layers": completed,
                        "files": files, "reports": reports, "time_s": time_s}
            _write_durably(self.folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
            _fsync(self.folder)  # the rename itself reaches the disk: the commit point
            self._files = files
            for path in self.folder.iterdir():  # what the committed state does not name
                if path.name != MANIFEST and path.name not in files:
                    path.unlink(missing_ok=True)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread by wait()
            self._error = exc


def _layer_file(index: int) -> str:
    return f"layer{index:05d}.safetensors"


def _hidden_file(completed: int) -> str:
    return f"hidden-{completed:05d}.safetensors"


def completed_in(folder: str | os.PathLike) -> int | None:
    """The layer count a (possibly foreign) state in ``folder`` has committed, or None: for messages only."""
    try:
        return int(json.loads((Path(folder) / MANIFEST).read_text())["completed_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def layer_file(index: int) -> str:
    """The name of layer ``index``'s record in a state folder (streamed runs: the layer's shard of the output)."""
    return _layer_file(index)


__all__ = ["MANIFEST", "ResumeError", "ResumeState", "checkpoint_fingerprint", "completed_in", "fingerprint",
           "layer_file"]
