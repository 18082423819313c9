"""Progress of Ray jobs on the driver, read from the runs' metrics.jsonl files.

The workers of a data-parallel student and the trials of a sweep do not send
their output to the driver (`log_to_driver=False`: all of it would interleave).
They already append their records to RUN/metrics.jsonl on storage the driver
sees (the run folder must be shared anyway), so the driver tails those files in
a thread and draws one tqdm line per run:

    mcad-run  40%|####      | 24/60 [00:12<00:18, 2.0step/s, epoch 2/5, 410 samples/s, val rsum 123.4]

    with RunProgress({"train-student": run}, steps={"train-student": 60}, epochs=5):
        trainer.fit()
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _Tail:
    path: Path
    total: int | None
    offset: int = 0
    partial: bytes = b""
    state: dict = field(default_factory=dict)
    bar: object = None


class RunProgress:
    """Tails `runs` (label -> run folder) and keeps one bar per run once its metrics.jsonl has a record;
    `steps` gives each label's total steps where known."""

    def __init__(self, runs, *, steps: dict[str, int] | None = None, epochs: int | None = None,
                 enabled: bool = True, interval_s: float = 0.5):
        self.runs = dict(runs)
        self.steps, self.epochs, self.enabled, self.interval_s = steps or {}, epochs, enabled, interval_s
        self.tails: dict[str, _Tail] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunProgress":
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, name="mcad-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self.poll()  # the last records
        for tail in self.tails.values():
            if tail.bar is not None:
                tail.bar.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # progress must never take the job down
                pass

    def poll(self) -> None:
        from mcad.student.curves import METRICS_FILE

        for label, run in self.runs.items():
            tail = self.tails.get(label)
            if tail is None:
                tail = self.tails[label] = _Tail(Path(run) / METRICS_FILE, self.steps.get(label))
            if self._read(tail):
                self._draw(label, tail)

    @staticmethod
    def _read(tail: _Tail) -> bool:
        """Fold the complete lines appended since the last read into tail.state; True if any."""
        try:
            size = tail.path.stat().st_size
        except OSError:
            return False
        if size < tail.offset:  # rewritten (a fresh run, or a resume keeping its first lines)
            tail.offset, tail.partial, tail.state = 0, b"", {}
        if size == tail.offset:
            return False
        with open(tail.path, "rb") as fh:
            fh.seek(tail.offset)
            data = tail.partial + fh.read(size - tail.offset)
        tail.offset = size
        *lines, tail.partial = data.split(b"\n")
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            tail.state["step"] = max(int(record.get("step", 0)), tail.state.get("step", 0))
            if "epoch" in record:  # 0-based in the records
                tail.state["epoch"] = int(record["epoch"]) + 1
            if record.get("samples_per_s") is not None:
                tail.state["samples_per_s"] = float(record["samples_per_s"])
            if record.get("val_rsum") is not None:
                tail.state["val_rsum"] = float(record["val_rsum"])
        return bool(lines)

    def _draw(self, label: str, tail: _Tail) -> None:
        from tqdm import tqdm

        if tail.bar is None:
            tail.bar = tqdm(total=tail.total, desc=label, unit="step", position=len(self.tails) - 1,
                            dynamic_ncols=True, mininterval=0)
        state, bar = tail.state, tail.bar
        if bar.total is not None and state["step"] > bar.total:
            bar.total = state["step"]
        bar.update(state["step"] - bar.n)
        bar.set_postfix_str(progress_text(state, self.epochs))


def progress_text(state: dict, epochs: int | None) -> str:
    """'epoch 2/5, 410 samples/s, val rsum 123.4' from a run's tailed state."""
    parts = [f"epoch {max(1, state.get('epoch', 0))}" + (f"/{epochs}" if epochs else "")]
    if "samples_per_s" in state:
        parts.append(f"{state['samples_per_s']:.0f} samples/s")
    parts.append(f"val rsum {state['val_rsum']:.1f}" if "val_rsum" in state else "val rsum -")
    return ", ".join(parts)
