"""Training records: `metrics.jsonl` (one JSON object a line) and its loss-curve PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path

METRICS_FILE, CURVE_FILE = "metrics.jsonl", "loss_curve.png"


class MetricsLog:
    """Appends records to RUN/metrics.jsonl; a resumed run keeps the lines before its checkpoint."""

    def __init__(self, run: str | os.PathLike, *, keep_until_step: int | None = None,
                 report_to: tuple[str, ...] = (), hparams: dict | None = None):
        self.path = Path(run) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_until_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif keep_until_step is None:
            self.path.unlink(missing_ok=True)
        self.tensorboard = None
        if "tensorboard" in report_to:  # student/tensorboard.py; a resumed run drops the events after its checkpoint
            from mcad.student.tensorboard import TensorBoardLog

            self.tensorboard = TensorBoardLog(run, hparams=hparams, purge_step=None if keep_until_step is None
                                              else keep_until_step + 1)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_curves(run: str | os.PathLike) -> Path | None:
    """Loss terms per step and validation rsum per epoch, as RUN/loss_curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run) / METRICS_FILE
    if not path.exists():
        return None
    records = read_metrics(path)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch" and "val_rsum" in r]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in ("loss", "con", "dist", "feat"):
        points = [(r["step"], r[name]) for r in steps if name in r]
        if points:
            ax_loss.plot(*zip(*points), label=name, lw=1)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_loss.legend(fontsize=8)
    if epochs:
        ax_val.plot([r["epoch"] + 1 for r in epochs], [r["val_rsum"] for r in epochs], marker="o")
    ax_val.set(xlabel="epoch", ylabel="rsum (%)", title="validation recall sum")
    fig.tight_layout()
    out = Path(run) / CURVE_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
