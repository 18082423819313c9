"""`--report-to tensorboard`: the records of metrics.jsonl also as TensorBoard event files.

RUN/tensorboard/ holds one TensorBoard run: per logged step `train/<name>` for
every number of the step record (loss, each loss term, lr, logit_scale,
samples_per_s); per epoch `val/rsum`, `val/i2t_R@K`, `val/t2i_R@K` and
`epoch/samples_per_s`, `epoch/seconds` (x axis: the step). A sweep's trial also
writes its grid point as hparams (TensorBoard's HPARAMS tab, metric val/rsum).
metrics.jsonl stays the record the code reads back; the events are for people.

The `tensorboard` package is an optional extra (`pip install 'mcad[tensorboard]'`):
`require` says so in one line before anything runs.
"""
from __future__ import annotations

import os
from pathlib import Path

from mcad.storage.errors import InputError

TB_DIR = "tensorboard"
REPORTERS = ("tensorboard",)
INSTALL_HINT = ("--report-to tensorboard needs the tensorboard package: "
                "pip install 'mcad[tensorboard]' (or pip install tensorboard)")


def check_names(report_to) -> tuple[str, ...]:
    """The reporters asked for, as a tuple; an unknown name is refused (one line)."""
    report_to = tuple(report_to or ())
    unknown = [r for r in report_to if r not in REPORTERS]
    if unknown:
        raise InputError(f"report_to: unknown {unknown}; choose from {list(REPORTERS)}")
    return report_to


def require(report_to) -> tuple[str, ...]:
    """The reporters asked for, checked: known names, and their package importable (else one line)."""
    report_to = check_names(report_to)
    if "tensorboard" in report_to:
        import importlib

        try:
            importlib.import_module("tensorboard")
        except ImportError:
            raise InputError(INSTALL_HINT) from None
    return report_to


class TensorBoardLog:
    """Writes metrics records (the dicts MetricsLog writes) as scalars to RUN/tensorboard/."""

    def __init__(self, run: str | os.PathLike, *, purge_step: int | None = None, hparams: dict | None = None):
        require(("tensorboard",))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run) / TB_DIR), purge_step=purge_step)
        if hparams:
            self._hparams(hparams)

    def _hparams(self, hparams: dict) -> None:
        """The grid point in this run itself (torch's add_hparams would make a sub-run)."""
        from torch.utils.tensorboard.summary import hparams as summaries

        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        for summary in summaries(values, {"val/rsum": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def write(self, record: dict) -> None:
        step = int(record["step"])
        if record.get("kind") == "step":
            for name, value in record.items():
                if name not in ("kind", "step", "epoch") and _number(value):
                    self.writer.add_scalar(f"train/{name}", value, step)
        elif record.get("kind") == "epoch":
            for name in ("samples_per_s", "seconds"):
                if _number(record.get(name)):
                    self.writer.add_scalar(f"epoch/{name}", record[name], step)
            val = record.get("val") or {}
            if _number(val.get("rsum")):
                self.writer.add_scalar("val/rsum", val["rsum"], step)
            for direction in ("i2t", "t2i"):
                for k, value in (val.get(direction) or {}).items():
                    if _number(value):
                        self.writer.add_scalar(f"val/{direction}_{k}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
