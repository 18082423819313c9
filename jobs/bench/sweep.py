"""`mcad bench sweep`: trials per hour from one signal store against the same trials with teachers online.

The product's claim in one figure: a sweep over a stored teacher pass runs
students as fast as plain fine-tunes, while the paper's online setting pays
for both teachers in every trial. Both sweeps run here, one after the other,
on the same store, the same grid and the same local (or given) Ray cluster:

  stored   `mcad pipeline sweep` as users run it (signals from the store)
  online   the same sweep with `--online-teachers` (teachers in every step)

Without --store, a store is built first (shapes data, random teachers of
--size, a teacher pass), exactly as `mcad bench student` builds one; that
pass's seconds are reported too, to say after how many trials it pays back.

    mcad bench sweep --json bench-sweep.json
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mcad.jobs.bench.machine import machine_info


@dataclass(frozen=True)
class SweepBenchConfig:
    trials: int = 2             # grid points (alpha values spread over [0, 1])
    epochs: int = 2             # epochs per trial; ASHA never stops a trial early here
    parallel: int = 1           # trials at once
    preset: str = "s"
    size: str = "demo"          # teacher size of a built store
    samples: int = 2048         # enough steps that training, not Ray/Tune start-up, is what is timed
    pool_size: int = 64
    topk: int = 16
    seed: int = 0

    def __post_init__(self):
        from mcad.storage.errors import InputError

        if min(self.trials, self.epochs, self.parallel) < 1:
            raise InputError(f"trials, epochs and parallel must be >= 1, got "
                             f"{self.trials}, {self.epochs}, {self.parallel}")

    def grid(self) -> dict:
        n = self.trials
        return {"alpha": [round(i / max(1, n - 1), 4) for i in range(n)]}


def run_sweep_bench(cfg: SweepBenchConfig, *, workdir: str | None = None, ray_address: str | None = None,
                    progress: bool = True) -> dict:
    from mcad.jobs.bench.student import StudentBenchConfig, build_store
    from mcad.jobs.sweep import SweepJob, run_sweep

    with tempfile.TemporaryDirectory(prefix="mcad-bench-sweep-", dir=workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        store, train, teachers = build_store(
            root, StudentBenchConfig(preset=cfg.preset, size=cfg.size, samples=cfg.samples,
                                     pool_size=cfg.pool_size, topk=cfg.topk, seed=cfg.seed),
            ray_address=ray_address, progress=progress)
        build_s = time.perf_counter() - t0
        seconds, tables = {}, {}
        for variant, online in (("stored", None), ("online", teachers)):
            job = SweepJob(store=str(store), data=str(train), val_data=str(root / "data" / "val"),
                           out=str(root / f"sweep_{variant}"), grid=cfg.grid(), epochs=cfg.epochs,
                           parallel=cfg.parallel, grace_epochs=cfg.epochs, online_teachers=online,
                           ray_address=ray_address)
            t0 = time.perf_counter()
            result = run_sweep(job, progress=False)
            seconds[variant] = time.perf_counter() - t0
            tables[variant] = [{k: r[k] for k in ("trial", "status", "epochs")} for r in result["table"]]
    per_hour = {v: 3600.0 * cfg.trials / s for v, s in seconds.items()}
    per_trial = {v: s / cfg.trials for v, s in seconds.items()}
    saved = per_trial["online"] - per_trial["stored"]
    figures = {"stored_trials_per_hour": per_hour["stored"], "online_trials_per_hour": per_hour["online"],
               "stored_sweep_s": seconds["stored"], "online_sweep_s": seconds["online"],
               "store_build_s": build_s, "trials": cfg.trials, "epochs_per_trial": cfg.epochs,
               # The one teacher pass is paid back after this many trials (build time includes
               # data synthesis and teacher construction, so this overstates it slightly).
               "trials_to_pay_back_store": build_s / saved if saved > 0 else None,
               "what_is_timed": "Wall time of each whole `run_sweep` call (Ray start, trials, "
                                "validation each epoch, export, results table), the same grid twice."}
    return {"bench": "sweep", "ratios": {"stored_over_online_trials_per_hour": per_hour["stored"] / per_hour["online"]},
            "figures": figures, "machine": {**machine_info(), "load_average_at_end": list(os.getloadavg())},
            "checks": tables, "config": asdict(cfg)}


def format_table(result: dict) -> str:
    f, r = result["figures"], result["ratios"]
    pay = f["trials_to_pay_back_store"]
    return "\n".join([
        f"sweep of {f['trials']} trials x {f['epochs_per_trial']} epochs, preset {result['config']['preset']}",
        f"{'':<28}{'trials/hour':>12}{'sweep s':>10}",
        f"{'stored (the product)':<28}{f['stored_trials_per_hour']:>12.1f}{f['stored_sweep_s']:>10.1f}",
        f"{'teachers online':<28}{f['online_trials_per_hour']:>12.1f}{f['online_sweep_s']:>10.1f}",
        f"stored_over_online_trials_per_hour  {r['stored_over_online_trials_per_hour']:.2f}",
        f"store built in {f['store_build_s']:.1f} s; paid back after "
        + (f"{pay:.1f} trials" if pay is not None else "never (online was not slower)")])
