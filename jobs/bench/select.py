"""`mcad bench select`: choose the student's settings on the val split, one factor at a time.

The selection protocol of the report (docs/design.md, section 3, "Evaluation"):
every setting is chosen on val, test is never read. Starting from the current
defaults, each step is one `mcad pipeline sweep` over one factor, the others
held at the values chosen so far (coordinate ascent); the factor's winner is
the trial with the highest validation rsum at its last epoch (ASHA may stop
the weak ones early). The last step compares epoch budgets with every other
setting chosen. Each step's sweep folder keeps its own results.csv.

    mcad bench select --store store/ --data data/train --val-data data/val --out select/
    mcad bench select ... --factor kd_temperature=1,2,4,8 --factor beta=0,0.5,1 --epoch-budgets 6,10

Outputs: OUT/<step>-<factor>/ (a sweep: results.csv, trials/), OUT/selection.json
(every step's table, the winners, the chosen settings, the rule) and
OUT/selection.md. An interrupted selection continues with `--resume`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from mcad.storage.errors import InputError

# The factors issue #14 asks to choose, in this order, with the values tried.
FACTORS = (
    ("kd_temperature", (1.0, 2.0, 4.0, 8.0)),
    ("alpha", (0.0, 0.5, 1.0)),
    ("beta", (0.0, 0.5, 1.0, 2.0)),
    ("k_prime", (4, 8, 16)),
    ("w_dist", (0.5, 1.0, 2.0)),
    ("w_feat", (0.5, 1.0, 2.0)),
)
EPOCH_BUDGETS = (6, 10, 15)
RULE = ("coordinate ascent from the defaults: one factor per sweep, the others at the values chosen so far; "
        "the winner is the highest validation rsum at the trial's last epoch (ties: the earlier value listed); "
        "then the epoch budgets are compared with every chosen setting. Test is never read.")
SELECTION_NAME = "selection.json"


@dataclass(frozen=True)
class SelectConfig:
    store: str
    data: str
    val_data: str
    out: str
    factors: tuple = FACTORS                    # ((name, (values...)), ...), in order
    epochs: int = 10                            # every factor step's horizon
    epoch_budgets: tuple[int, ...] = EPOCH_BUDGETS  # the last step; () skips it
    parallel: int = 2
    grace_epochs: int = 3
    preset: str = "s"
    seed: int = 0
    ray_address: str | None = None
    resume: bool = False

    def __post_init__(self):
        if not self.factors and not self.epoch_budgets:
            raise InputError("nothing to select: give at least one factor or epoch budget")
        if any(e < 1 for e in (self.epochs, *self.epoch_budgets)):
            raise InputError(f"epochs must be at least 1, got {self.epochs} and budgets {self.epoch_budgets}")


def parse_factors(specs: tuple[str, ...]) -> tuple:
    """("kd_temperature=1,2,4", ...) -> ((name, (values...)), ...), typed as the sweep's grid is."""
    from mcad.jobs.sweep import parse_grid

    out = []
    for spec in specs:
        grid = parse_grid([spec])
        (name, values), = grid.items()
        out.append((name, tuple(values)))
    return tuple(out)


def _winner(table: list[dict], name: str, values: tuple) -> tuple:
    """The value of `name` in the best finished-or-stopped row; ties go to the value listed first."""
    from mcad.jobs.sweep import METRIC

    scored = [r for r in table if r[METRIC] != ""]
    if not scored:
        raise InputError(f"select {name}: no trial reported a validation rsum")
    best = max(r[METRIC] for r in scored)
    tied = {r[name] for r in scored if r[METRIC] == best}
    return next(v for v in values if v in tied), best


def _sweep(cfg: SelectConfig, folder: Path, grid: dict, epochs: int, grace: int) -> dict:
    from mcad.jobs.sweep import SweepJob, run_sweep

    resume = cfg.resume and (folder / "sweep_config.json").is_file()
    job = SweepJob(store=cfg.store, data=cfg.data, val_data=cfg.val_data, out=str(folder), grid=grid,
                   epochs=epochs, parallel=cfg.parallel, grace_epochs=min(grace, epochs),
                   ray_address=cfg.ray_address, resume=resume)
    return run_sweep(job, progress=False)


def run_select(cfg: SelectConfig, *, echo=print) -> dict:
    """Run (or continue) the selection; return selection.json's dict."""
    from mcad.storage import fs
    from mcad.storage.atomic import atomic_write_json
    from mcad.student.config import TrainConfig

    out = Path(cfg.out)
    if not cfg.resume:
        fs.require_empty(out, "pass --resume to continue that selection or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    chosen = {"preset": cfg.preset, "seed": cfg.seed}
    chosen.update({name: defaults[name] for name, _ in cfg.factors})
    steps = []
    for i, (name, values) in enumerate(cfg.factors, start=1):
        grid = {k: [v] for k, v in chosen.items() if k != name} | {name: list(values)}
        echo(f"[select] step {i}: {name} in {list(values)} with {_fixed(chosen, name)}")
        result = _sweep(cfg, out / f"{i}-{name}", grid, cfg.epochs, cfg.grace_epochs)
        value, rsum = _winner(result["table"], name, values)
        echo(f"[select] {name} = {value} (val rsum {rsum:.2f}; default {defaults[name]})")
        chosen[name] = value
        steps.append(_step(name, values, defaults[name], value, rsum, cfg.epochs, result["table"]))
    epochs = cfg.epochs
    if cfg.epoch_budgets:
        tables = []
        for e in cfg.epoch_budgets:
            echo(f"[select] epochs {e} with {_fixed(chosen, None)}")
            grid = {k: [v] for k, v in chosen.items()}
            result = _sweep(cfg, out / f"{len(steps) + 1}-epochs-{e}", grid, e, grace=e)  # no early stop
            tables += [{**row, "epochs_budget": e} for row in result["table"]]
        value, rsum = _winner(tables, "epochs_budget", tuple(cfg.epoch_budgets))
        echo(f"[select] epochs = {value} (val rsum {rsum:.2f}; default {defaults['epochs']})")
        epochs = value
        steps.append(_step("epochs", cfg.epoch_budgets, defaults["epochs"], value, rsum, None, tables))
    selection = {"config": json.loads(json.dumps(dataclasses.asdict(cfg))), "rule": RULE, "steps": steps,
                 "chosen": {**{k: v for k, v in chosen.items() if k not in ("preset", "seed")}, "epochs": epochs},
                 "defaults": {k: defaults[k] for k in [n for n, _ in cfg.factors] + ["epochs"]}}
    atomic_write_json(out / SELECTION_NAME, selection)
    (out / "selection.md").write_text(markdown(selection))
    return selection


def _fixed(chosen: dict, name: str | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in chosen.items() if k != name)


def _step(name, values, default, value, rsum, epochs, table) -> dict:
    from mcad.jobs.sweep import METRIC

    column = "epochs_budget" if name == "epochs" else name
    rows = [{"value": r[column], METRIC: r[METRIC], "epochs_run": r["epochs"], "status": r["status"]}
            for r in table]
    return {"factor": name, "values": list(values), "default": default, "chosen": value, "val_rsum": rsum,
            "epochs": epochs, "trials": sorted(rows, key=lambda r: list(values).index(r["value"]))}


def markdown(selection: dict) -> str:
    from mcad.jobs.sweep import METRIC

    c = selection["config"]
    lines = ["# Settings chosen on val", "",
             f"Store `{c['store']}`, val `{c['val_data']}`, preset `{c['preset']}`, seed {c['seed']}. "
             f"Rule: {selection['rule']}", "",
             "| step | factor | value | val rsum | epochs run | status |", "|---|---|---|---|---|---|"]
    for i, step in enumerate(selection["steps"], start=1):
        for t in step["trials"]:
            mark = " (chosen)" if t["value"] == step["chosen"] else ""
            mark += " (default)" if t["value"] == step["default"] else ""
            lines.append(f"| {i} | {step['factor']} | {t['value']}{mark} | {t[METRIC]} | {t['epochs_run']} | "
                         f"{t['status']} |")
    lines += ["", "Chosen: " + ", ".join(f"{k} = {v}" for k, v in selection["chosen"].items()),
              "", "Defaults before: " + ", ".join(f"{k} = {v}" for k, v in selection["defaults"].items()), ""]
    return "\n".join(lines)
