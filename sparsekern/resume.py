"""Resumable pruning: after each decoder layer, its pruned weights and the next layer's inputs go to a folder.

A run that dies part-way (out of memory, preempted, Ctrl-C) restarts from the first unfinished layer instead of
from scratch. Everything is written to a temporary file and renamed, so a crash while saving leaves the previous
state intact. The state is tied to a fingerprint of the run (model config, method and options, pattern,
calibration ids): a folder left by a different run is refused rather than silently mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "progress.json"


def fingerprint(model: torch.nn.Module, calibration: torch.Tensor, settings: dict) -> str:
    """A hash of everything that determines the result of a run."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update((config.to_json_string() if hasattr(config, "to_json_string") else repr(config)).encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(calibration.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _save_atomically(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=1))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


class ResumeState:
    """The per-layer progress of one pruning run in ``folder``."""

    def __init__(self, folder: str | os.PathLike, run_fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = run_fingerprint

    def completed_layers(self) -> int:
        """How many layers a previous run of the same configuration finished (0 if none)."""
        state_path = self.folder / STATE_FILE
        if not state_path.is_file():
            return 0
        state = json.loads(state_path.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"{self.folder} holds a partial run with different settings (model, method, pattern or "
                "calibration); remove that folder to start over, or rerun with the same settings to resume"
            )
        return int(state["completed_layers"])

    def save(self, completed: int, weights: dict[str, torch.Tensor], hidden: list[torch.Tensor],
             reports: list[dict]) -> None:
        """Record that layers [0, completed) are done: this layer's new weights and the next layer's inputs."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _save_atomically({k: v.detach().cpu() for k, v in weights.items()},
                         self.folder / f"layer{completed - 1:05d}.pt")
        _save_atomically([h.detach().cpu() for h in hidden], self.folder / "hidden.pt")
        _save_atomically({"fingerprint": self.fingerprint, "completed_layers": completed, "reports": reports},
                         self.folder / STATE_FILE)

    def load(self, completed: int, device: torch.device) -> tuple[list[dict[str, torch.Tensor]], list, list]:
        """(per-layer weights for the completed layers, the next layer's inputs on ``device``, reports)."""
        weights = [torch.load(self.folder / f"layer{i:05d}.pt", weights_only=True) for i in range(completed)]
        hidden = [h.to(device) for h in torch.load(self.folder / "hidden.pt", weights_only=True)]
        reports = json.loads((self.folder / STATE_FILE).read_text())["reports"]
        return weights, hidden, reports
