"""The student training loop: MCAD (or plain contrastive) from batches of teacher signals.

Where the batches come from is not this module's business: `jobs/` hands in a
function `batches(epoch)` that yields collated batches (student/data.py) with
stored signals (the signal store) or online signals (teachers in the loop),
and an optional `validate(student) -> EVAL dict`. The loop itself reads as a
story: build targets, compute the loss, step, log, checkpoint each epoch.

    result = train(cfg, student=student, batches=batches, steps_per_epoch=n,
                   teacher_logit_scale=s, run=Path("runs/mcad"), validate=val)
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from mcad.student.data import ATTENTION, BLOCK, INPUT_IDS, PIXELS, SIGNALS
from mcad.student.checkpoint import load_checkpoint, save_checkpoint
from mcad.student.curves import MetricsLog, plot_curves
from mcad.student.config import TrainConfig
from mcad.student.losses import mcad_loss, metrics_to_floats
from mcad.student.targets import mcad_targets

def train(cfg: TrainConfig, *, student, batches: Callable[[int], Iterable[dict]], steps_per_epoch: int,
          teacher_logit_scale: float, run: Path, validate: Callable | None = None,
          resume: bool = False, progress: bool = True, device: str | torch.device = "cpu",
          on_epoch: Callable[[dict], None] | None = None, report_to: tuple[str, ...] = (),
          hparams: dict | None = None) -> dict:
    """Train `student` for cfg.epochs; checkpoint every epoch; return the last epoch's record.

    Data parallel when torch.distributed is initialised (jobs/ sets it up, on
    Ray Train): the student is wrapped in DDP, each rank trains on the batches
    its `batches(epoch)` yields (its own split), gradients are averaged, ranks
    with fewer batches join early (torch's Join), and only rank 0 validates,
    logs and checkpoints. `on_epoch(record)` is called on every rank after
    each epoch (a sweep reports the record to its scheduler there).
    `report_to=("tensorboard",)`: rank 0 also writes RUN/tensorboard/ (student/tensorboard.py),
    with `hparams` (a sweep's grid point) when given.
    """
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    world = Distributed.current()
    student.to(device)
    model = world.wrap(student, device)
    total = max(1, cfg.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, cfg.warmup))
    state = load_checkpoint(run / "checkpoints", model=student, optimizer=optimizer,
                            scheduler=scheduler) if resume else None
    start_epoch, step = (state["epoch"] + 1, state["step"]) if state else (0, 0)
    log = MetricsLog(run, keep_until_step=step if state else None, report_to=report_to,
                     hparams=hparams) if world.main else None
    record: dict = dict(state.get("record", {})) if state else {}
    for epoch in range(start_epoch, cfg.epochs):
        student.train()
        started, seen = time.perf_counter(), 0
        last_log = (started, 0)  # samples/s of a step record: since the previous one
        bar = tqdm(batches(epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="step", disable=not (progress and world.main), leave=False)
        with world.join(model):
            for batch in bar:
                batch = {k: v.to(device) for k, v in batch.items()}
                loss, metrics = batch_loss(cfg, model, batch, teacher_logit_scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                step, seen = step + 1, seen + len(batch[INPUT_IDS])
                if log and (step % cfg.log_every == 0 or step == 1):
                    values = metrics_to_floats(metrics)  # floats only here: each one waits for the device
                    now = time.perf_counter()
                    # Data parallel: rank 0's rate times the ranks (the epoch record counts them all).
                    rate = (seen - last_log[1]) * world.size / (now - last_log[0]) if now > last_log[0] else 0.0
                    last_log = (now, seen)
                    log.write({"kind": "step", "step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                               **values, "samples_per_s": rate})
                    bar.set_postfix(loss=f"{values['loss']:.3f}")
        seconds = time.perf_counter() - started
        seen, step = world.total(seen), world.maximum(step)
        record = {"kind": "epoch", "epoch": epoch, "step": step, "seconds": seconds, "samples": seen,
                  "samples_per_s": seen / seconds if seconds else 0.0}
        if world.main:
            if validate is not None:
                val = validate(student)
                record.update(val_rsum=val["rsum"], val=val)
            log.write(record)
            save_checkpoint(run / "checkpoints", model=student, optimizer=optimizer, scheduler=scheduler,
                            state={"epoch": epoch, "step": step, "record": record})
            plot_curves(run)
            if progress:
                val_text = f", val rsum {record['val_rsum']:.1f}" if "val_rsum" in record else ""
                bar.write(f"epoch {epoch + 1}/{cfg.epochs}: {seen} samples in {seconds:.1f} s{val_text}")
        record = world.share(record)
        if on_epoch is not None:
            on_epoch(record)
    if log is not None:
        log.close()
    return record


def batch_loss(cfg: TrainConfig, student, batch: dict, teacher_logit_scale: float):
    """The MCAD loss of one collated batch: student forward, targets from signals, weighted terms."""
    out = student(batch[PIXELS], batch[INPUT_IDS], batch[ATTENTION])
    targets = None
    if cfg.needs_targets:
        targets = mcad_targets(**{k: batch[k] for k in SIGNALS}, block=batch[BLOCK],
                               logit_scale=teacher_logit_scale, alpha=cfg.alpha, beta=cfg.beta,
                               k_prime=cfg.k_prime, itm_temperature=cfg.itm_temperature,
                               itm_norm=cfg.itm_norm, rank_by=cfg.rank_by if cfg.w_rank > 0 else None)
    return mcad_loss(weights=cfg.weights(), image=out["image"], text=out["text"],
                     logit_scale=out["logit_scale"], targets=targets,
                     image_proj=out["image_head"], text_proj=out["text_head"], temperature=cfg.kd_temperature)


@dataclass(frozen=True)
class Distributed:
    """The data-parallel context of this process: one process, or a rank of a torch process group."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "Distributed":
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), size=dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module, device) -> torch.nn.Module:
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
        # The feature heads get no gradient when w_feat = 0: let DDP skip them.
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def join(self, model):
        """Uneven splits: a rank out of batches keeps shadowing the others' all-reduces."""
        if self.size == 1:
            return contextlib.nullcontext()
        from torch.distributed.algorithms.join import Join

        return Join([model])

    def total(self, value: int) -> int:
        return self._reduce(value, torch.distributed.ReduceOp.SUM) if self.size > 1 else value

    def maximum(self, value: int) -> int:
        return self._reduce(value, torch.distributed.ReduceOp.MAX) if self.size > 1 else value

    def share(self, record: dict) -> dict:
        """Rank 0's record on every rank (sent as JSON bytes: nothing is unpickled)."""
        if self.size == 1:
            return record
        data = json.dumps(record).encode() if self.main else b""
        length = self._tensor([len(data)])
        torch.distributed.broadcast(length, src=0)
        buf = self._tensor(list(data) if self.main else [0] * int(length.item()), dtype=torch.uint8)
        torch.distributed.broadcast(buf, src=0)
        return json.loads(bytes(buf.cpu().tolist()).decode())

    def _reduce(self, value: int, op) -> int:
        t = self._tensor([value])
        torch.distributed.all_reduce(t, op=op)
        return int(t.item())

    @staticmethod
    def _tensor(values: list[int], dtype=torch.long) -> torch.Tensor:
        nccl = torch.distributed.get_backend() == "nccl"  # nccl only moves CUDA tensors
        return torch.tensor(values, dtype=dtype, device="cuda" if nccl else "cpu")


def warmup_cosine(total_steps: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup over `warmup` of the steps, then cosine to zero."""
    warm = max(1, int(round(warmup * total_steps)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
