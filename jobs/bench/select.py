"""`mcad bench select`: choose the student's settings on the val split, one factor at a time.

The selection protocol of the report (docs/design.md, section 3, "Evaluation"):
every setting is chosen on val, test is never read. Starting from the current
defaults, each step is one `mcad pipeline sweep` over one factor, the others
held at the values chosen so far (coordinate ascent); the factor's winner is
the trial with the highest validation rsum among those that finished their
epochs (ASHA may stop the weak ones early; the incumbent, already run, wins
ties). The last step compares epoch budgets with every other setting chosen.
Each step's sweep folder keeps its own results.csv; points run before are
reused (see RULE).

    mcad bench select --store store/ --data data/train --val-data data/val --out select/
    mcad bench select ... --factor kd_temperature=1,2,4,8 --factor beta=0,0.5,1 --epoch-budgets 6,10

Outputs: OUT/select_config.json (what the trials share), OUT/<step>-<factor>[-N]/ (a sweep: results.csv,
trials/), OUT/selection.json
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
RULE = ("coordinate ascent from the defaults: one factor at a time, the others at the values chosen so far; "
        "the value chosen so far (the incumbent) and the other values each train once (a point already run in "
        "an earlier step is reused: training is deterministic from its settings and seed), the values not yet "
        "run in one sweep (ASHA may stop the weak ones early, and a value it stopped must be below the "
        "incumbent's validation rsum at the same epoch, else the step is undecided and must be rerun without "
        "early stopping); the winner is the highest validation rsum among the trials that finished all their "
        "epochs, the incumbent winning ties; then the epoch budgets are compared the same way (each budget its own run, no early stopping). "
        "Test is never read.")
SELECTION_NAME, SELECT_CONFIG = "selection.json", "select_config.json"


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


def _winner(rows: list[dict], incumbent, incumbent_at: dict[int, float] | None = None) -> tuple:
    """(value, rsum) of the best row that finished its epochs; the incumbent wins ties.

    A trial ASHA stopped early reports an earlier epoch's rsum: it never wins, and with
    `incumbent_at` (the incumbent's val rsum per epoch, 1-based) it must also be below the incumbent
    at the epoch it stopped, since ASHA compared it only with the other values of its sweep."""
    from mcad.jobs.sweep import FINISHED, METRIC, STOPPED

    for r in rows:
        if incumbent_at is not None and r["status"] == STOPPED and r["value"] != incumbent:
            mark = incumbent_at.get(r["epochs"])
            if mark is None or r[METRIC] >= mark:
                raise InputError(
                    f"select: {r['value']} was stopped early at epoch {r['epochs']} with val rsum {r[METRIC]}, "
                    f"not below the incumbent {incumbent} there ({mark}): undecided; rerun with "
                    f"--grace-epochs at least the step's epochs")
    done = [r for r in rows if r["status"] == FINISHED and r[METRIC] is not None]
    if not done:
        raise InputError(f"select: no trial of {[r['value'] for r in rows]} finished its epochs")
    best = max(r[METRIC] for r in done)
    tied = [r["value"] for r in done if r[METRIC] == best]
    return (incumbent if incumbent in tied else tied[0]), best


def _curve(out: Path, record: dict, trial: str) -> dict[int, float]:
    """A trial's val rsum after each epoch (1-based), from its run's metrics.jsonl."""
    from mcad.jobs.sweep import METRIC, TRIALS_DIR
    from mcad.student.curves import METRICS_FILE, read_metrics

    path = out / record["sweep"] / TRIALS_DIR / trial / METRICS_FILE
    records = read_metrics(path) if path.is_file() else []
    return {int(r["epoch"]) + 1: float(r[METRIC]) for r in records if r.get("kind") == "epoch" and METRIC in r}


def known_trials(out: Path) -> dict[tuple[str, int], dict]:
    """(trial name, epochs) -> outcome ({status, epochs, val_rsum, sweep}) of every trial of every sweep
    under out. Training is deterministic from its settings and seed, so a point run once is not run again."""
    from mcad.jobs.sweep import CONFIG_NAME, FINISHED, STATUS_NAME, TRIALS_DIR

    known: dict[tuple[str, int], dict] = {}
    for config in sorted(out.rglob(CONFIG_NAME)):
        horizon = int(json.loads(config.read_text())["epochs"])
        for status in sorted((config.parent / TRIALS_DIR).glob(f"*/{STATUS_NAME}")):
            key = (status.parent.name, horizon)
            record = {**json.loads(status.read_text()), "sweep": str(config.parent.relative_to(out))}
            # The first run of a point that finished its epochs is its result; a run of the same point
            # ASHA stopped early (in another sweep's cohort) only saw a prefix of it.
            if key not in known or (known[key]["status"] != FINISHED and record["status"] == FINISHED):
                known[key] = record
    return known


def _folder(out: Path, base: str, grid: dict, epochs: int) -> tuple[Path, bool]:
    """A sweep folder for this grid: base, or base-2, base-3, ... when a folder holds another sweep;
    (folder, resume) where resume means the folder holds this very sweep, unfinished."""
    from mcad.jobs.sweep import CONFIG_NAME

    for n in range(1, 100):
        folder = out / (base if n == 1 else f"{base}-{n}")
        saved = folder / CONFIG_NAME
        if not saved.is_file():
            return folder, False
        before = json.loads(saved.read_text())
        if before.get("grid") == json.loads(json.dumps(grid)) and before.get("epochs") == epochs:
            return folder, True
    raise InputError(f"{out}: too many sweeps named {base}")


def _step(cfg: SelectConfig, out: Path, base: str, chosen: dict, name: str, values: tuple, incumbent,
          epochs: int, grace: int, echo) -> dict:
    """One factor: the incumbent (the value chosen so far) and the other values, each run once
    (earlier results reused), the winner by _winner."""
    from mcad.jobs.sweep import SweepJob, run_sweep, trial_name

    candidates = [incumbent] + [v for v in values if v != incumbent]
    point = {v: {**chosen, name: v} for v in candidates} if name != "epochs" else {v: dict(chosen) for v in candidates}
    horizon = {v: (v if name == "epochs" else epochs) for v in candidates}
    key = {v: (trial_name(point[v]), horizon[v]) for v in candidates}
    known = known_trials(out)
    todo = [v for v in candidates if key[v] not in known]
    for group in ([[v] for v in todo] if name == "epochs" else [todo] if todo else []):
        grid = {k: [v] for k, v in chosen.items() if k != name}
        if name != "epochs":
            grid[name] = group
        h = horizon[group[0]]
        folder, resume = _folder(out, base if name != "epochs" else f"{base}-{group[0]}", grid, h)
        echo(f"[select] {name}: running {group} -> {folder.name}")
        run_sweep(SweepJob(store=cfg.store, data=cfg.data, val_data=cfg.val_data, out=str(folder), grid=grid,
                           epochs=h, parallel=cfg.parallel, grace_epochs=min(grace, h),
                           ray_address=cfg.ray_address, resume=resume), progress=False)
    if todo:
        known = known_trials(out)
    rows = [{"value": v, **known[key[v]]} for v in candidates]
    value, rsum = _winner(rows, incumbent, _curve(out, known[key[incumbent]], key[incumbent][0]))
    return {"factor": name, "values": list(values), "incumbent": incumbent, "chosen": value, "val_rsum": rsum,
            "epochs": None if name == "epochs" else epochs,
            "trials": sorted(rows, key=lambda r: list(values).index(r["value"]) if r["value"] in values else -1)}


def run_select(cfg: SelectConfig, *, echo=print) -> dict:
    """Run (or continue) the selection; return selection.json's dict."""
    from mcad.storage import fs
    from mcad.storage.atomic import atomic_write_json
    from mcad.student.config import TrainConfig

    out = Path(cfg.out)
    if not cfg.resume:
        fs.require_empty(out, "pass --resume to continue that selection or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    _pin(cfg, out)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    chosen = {"preset": cfg.preset, "seed": cfg.seed}
    chosen.update({name: defaults[name] for name, _ in cfg.factors})
    steps = []
    for i, (name, values) in enumerate(cfg.factors, start=1):
        echo(f"[select] step {i}: {name} in {list(values)} (now {chosen[name]}) with {_fixed(chosen, name)}")
        step = _step(cfg, out, f"{i}-{name}", chosen, name, values, chosen[name], cfg.epochs, cfg.grace_epochs,
                     echo)
        echo(f"[select] {name} = {step['chosen']} (val rsum {step['val_rsum']:.2f}; default {defaults[name]})")
        chosen[name] = step["chosen"]
        steps.append({**step, "default": defaults[name]})
    epochs = cfg.epochs
    if cfg.epoch_budgets:
        i = len(steps) + 1
        echo(f"[select] step {i}: epochs in {list(cfg.epoch_budgets)} (now {epochs}) with {_fixed(chosen, None)}")
        step = _step(cfg, out, f"{i}-epochs", chosen, "epochs", tuple(cfg.epoch_budgets), cfg.epochs, cfg.epochs,
                     cfg.grace_epochs, echo)
        echo(f"[select] epochs = {step['chosen']} (val rsum {step['val_rsum']:.2f}; default {defaults['epochs']})")
        epochs = step["chosen"]
        steps.append({**step, "default": defaults["epochs"]})
    selection = {"config": json.loads(json.dumps(dataclasses.asdict(cfg))), "rule": RULE, "steps": steps,
                 "chosen": {**{k: v for k, v in chosen.items() if k not in ("preset", "seed")}, "epochs": epochs},
                 "defaults": {k: defaults[k] for k in [n for n, _ in cfg.factors] + ["epochs"]}}
    atomic_write_json(out / SELECTION_NAME, selection)
    (out / "selection.md").write_text(markdown(selection))
    return selection


PINNED = ("store", "data", "val_data", "preset", "seed")  # what every reused trial must share


def _pin(cfg: SelectConfig, out: Path) -> None:
    """Record what the selection's trials were trained on (OUT/select_config.json); a --resume with
    another store, data, val split, preset or seed is refused, since its trials are reused."""
    from mcad.storage.atomic import atomic_write_json

    path = out / SELECT_CONFIG
    now = {k: getattr(cfg, k) for k in PINNED}
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [k for k in PINNED if before.get(k) != now[k]]
        if changed:
            raise InputError(f"cannot resume {out}: {', '.join(f'{k} {before.get(k)!r} -> {now[k]!r}' for k in changed)}"
                             f"; its trials were trained on the first; choose a new --out")
    atomic_write_json(path, now)


def _fixed(chosen: dict, name: str | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in chosen.items() if k != name)


def markdown(selection: dict) -> str:
    from mcad.jobs.sweep import METRIC

    c = selection["config"]
    lines = ["# Settings chosen on val", "",
             f"Store `{c['store']}`, val `{c['val_data']}`, preset `{c['preset']}`, seed {c['seed']}. "
             f"Rule: {selection['rule']}", "",
             "| step | factor | value | val rsum | epochs run | status | sweep |", "|---|---|---|---|---|---|---|"]
    for i, step in enumerate(selection["steps"], start=1):
        for t in step["trials"]:
            mark = " (chosen)" if t["value"] == step["chosen"] else ""
            mark += " (incumbent)" if t["value"] == step["incumbent"] else ""
            lines.append(f"| {i} | {step['factor']} | {t['value']}{mark} | {t[METRIC]} | {t['epochs']} | "
                         f"{t['status']} | `{t['sweep']}` |")
    lines += ["", "Chosen: " + ", ".join(f"{k} = {v}" for k, v in selection["chosen"].items()),
              "", "Defaults before: " + ", ".join(f"{k} = {v}" for k, v in selection["defaults"].items()), ""]
    return "\n".join(lines)
