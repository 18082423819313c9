"""The fusion projection W (F, D) of docs/design.md (section 3, "Fusion projection"): g_i = normalise(f_ii W).

A teacher pass fits W once, on its first kept samples (`calibrate`: ridge regression of
the single teacher's fused states f_ii onto normalise(v_i + t_i) from the dual teacher),
writes it beside the store (`save_projection`) and applies it to every pool (`project`,
called by pipeline/signals.py and pipeline/views.py); the online signal source and the
bench read it back (`load_projection`). As in pipeline/signals.py, the maths runs on the
CPU: the fit in float64, W returned and stored as float32.

    W = calibrate(dual, single, chain(*map(iter_shard, shards)), config=cfg)   # cfg: a PassConfig
    save_projection(W, store / FUSION_PROJ_NAME)
    g = project(fused, load_projection(store / FUSION_PROJ_NAME))
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from mcad.pipeline.shards import Reject
from mcad.storage import fs
from mcad.storage.errors import InputError
from mcad.storage.iters import batched

if TYPE_CHECKING:  # a type only: pipeline/signals.py imports this module, not the other way round
    from mcad.pipeline.signals import PassConfig

PROJECTION_TENSOR = "fusion_proj"  # tensor name inside fusion_proj.safetensors; shape (F, D)


# ------------------------------------------------------------ pure maths

def projection_target(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """normalise(v_i + t_i): what the fusion projection regresses f_ii onto."""
    return F.normalize(v + t, dim=-1)


def fit_projection(fused: torch.Tensor, target: torch.Tensor, *, ridge: float = 1e-2) -> torch.Tensor:
    """W (F, D) = argmin ||fused W - target||² + ridge ||W||², in float64, returned float32.

    Closed form (XᵀX + ridge·I)⁻¹ XᵀY; ridge 0 gives the minimum-norm least squares.
    No intercept: g_i = normalise(f_ii W) as docs/design.md defines it (section 3, "Fusion projection").
    """
    if fused.ndim != 2 or target.ndim != 2 or fused.shape[0] != target.shape[0]:
        raise ValueError(f"need fused (n, F) and target (n, D), got {tuple(fused.shape)} and {tuple(target.shape)}")
    if fused.shape[0] == 0:
        raise InputError("no pairs to fit the fusion projection on")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    x, y = fused.detach().cpu().double(), target.detach().cpu().double()
    if ridge == 0:
        return torch.linalg.lstsq(x, y, driver="gelsd").solution.float()
    gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(gram, x.T @ y).float()


def project(fused: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """g_i = normalise(f_ii W)."""
    return F.normalize(fused.float() @ projection.to(fused.device).float(), dim=-1)


# ----------------------------------------------------------- calibration

def _kept(items: Iterable) -> Iterator:
    """Samples only: calibration skips rejects (shard_signals records them)."""
    return (item for item in items if not isinstance(item, Reject))


def calibration_pairs(dual, single, samples: Sequence, *, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """fused f_ii (n, F) and target normalise(v_i + t_i) (n, D) of positive pairs."""
    images = [s.image for s in samples]
    texts = [s.caption for s in samples]
    v = dual.encode_images(images).cpu().float()
    t = dual.encode_texts(texts).cpu().float()
    fused, _ = single.match(single.encode_images(images), texts, batch_size=batch)
    return fused.cpu().float(), projection_target(v, t)


def calibrate(dual, single, items: Iterable, *, config: PassConfig,
              progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Fit W (F, D) on the first `config.calibration_rows` kept samples of `items`.

    `items` are the pass's samples (and rejects, skipped) in order, e.g. its
    shards chained; only what is needed is read, in chunks of `pair_batch`.
    """
    fused, target = [], []
    size = single.pair_batch(config.pair_batch)
    for chunk in batched(islice(_kept(items), config.calibration_rows), size):
        f, y = calibration_pairs(dual, single, chunk, batch=size)
        fused.append(f)
        target.append(y)
        if progress is not None:
            progress(len(chunk))
    if not fused:
        raise InputError("no kept samples to fit the fusion projection on (is the input empty?)")
    return fit_projection(torch.cat(fused), torch.cat(target), ridge=config.ridge)


# -------------------------------------------------------------- the file

def save_projection(projection: torch.Tensor, path: str | Path, *,
                    metadata: dict[str, str] | None = None) -> str:
    """Write W to a safetensors file atomically (temp + rename locally; one upload at a URI)."""
    from safetensors.torch import save

    tensor = projection.detach().cpu().float().contiguous()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    fs.write_bytes(path, save({PROJECTION_TENSOR: tensor}, metadata=meta))
    return str(path)


def load_projection(path: str | Path) -> torch.Tensor:
    """W (F, D) float32 from a file written by save_projection."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    p = str(path)
    if not fs.is_file(p):
        raise InputError(f"{p}: no fusion projection file")
    try:
        tensors = load(fs.read_bytes(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{p}: not a readable safetensors file ({exc})") from None
    w = tensors.get(PROJECTION_TENSOR)
    if w is None or w.ndim != 2:
        raise InputError(f"{p}: no 2-D tensor {PROJECTION_TENSOR!r} in the file")
    return w.float()
