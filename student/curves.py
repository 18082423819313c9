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


TERMS = ("loss", "con", "dist", "feat", "rank")  # the total, then each MCAD term (student/losses.py)


def plot_curves(run: str | os.PathLike) -> Path | None:
    """RUN/loss_curve.png: one panel per loss term that was logged (the total, con, dist, feat, rank), each on
    a log y axis (the distillation term is scaled by T² and would flatten the others on one linear
    axis), then the validation rsum per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run) / METRICS_FILE
    if not path.exists():
        return None
    records = read_metrics(path)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch" and "val_rsum" in r]
    terms = {name: [(r["step"], r[name]) for r in steps if r.get(name, 0) > 0] for name in TERMS}
    terms = {name: points for name, points in terms.items() if points}
    fig, axes = plt.subplots(1, len(terms) + 1, figsize=(3.2 * (len(terms) + 1), 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], terms.items()):
        ax.plot(*zip(*points), lw=1, marker="." if len(points) < 20 else None)
        ax.set_yscale("log")
        ax.set(xlabel="step", title="total loss" if name == "loss" else f"{name} term")
    if terms:
        axes[0][0].set_ylabel("loss (log)")
    ax_val = axes[0][-1]
    if epochs:
        ax_val.plot([r["epoch"] + 1 for r in epochs], [r["val_rsum"] for r in epochs], marker="o")
    ax_val.set(xlabel="epoch", ylabel="rsum (%)", title="validation recall sum")
    fig.tight_layout()
    out = Path(run) / CURVE_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
