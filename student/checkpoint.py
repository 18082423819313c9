"""Student checkpoints: weights as safetensors, optimiser state with weights_only loading.

A checkpoint is a folder written under a temporary name and renamed into
place, so a crash leaves the previous checkpoint intact. No pickle on any
load path: model weights are safetensors, the optimiser and scheduler state
is loaded with `torch.load(weights_only=True)`, progress is JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mcad.storage.atomic import atomic_write_dir

WEIGHTS, OPTIMIZER, STATE = "student.safetensors", "optimizer.pt", "state.json"
LAST = "last"


def save_checkpoint(folder: str | os.PathLike, *, model: torch.nn.Module, optimizer, scheduler,
                    state: dict) -> Path:
    """Write folder/last atomically: the model, optimiser and scheduler states and `state` (JSON)."""
    def fill(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / WEIGHTS)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))

    return atomic_write_dir(Path(folder) / LAST, fill)


def load_checkpoint(folder: str | os.PathLike, *, model: torch.nn.Module, optimizer=None,
                    scheduler=None) -> dict | None:
    """Restore folder/last into model (and optimiser, scheduler); return its state, or None if absent."""
    last = Path(folder) / LAST
    if not (last / STATE).is_file():
        old = Path(folder) / f".old-{LAST}"  # a crash between the two renames
        if not (old / STATE).is_file():
            return None
        last = old
    model.load_state_dict(load_file(last / WEIGHTS))
    if optimizer is not None or scheduler is not None:
        extra = torch.load(last / OPTIMIZER, weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(extra["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(extra["scheduler"])
    return json.loads((last / STATE).read_text())
