"""`mcad bench levers`: the single-teacher levers of issue #18 on a finished `mcad bench report`.

Each `--arm NAME:KEY=V[,KEY=V...]` is a variant of the report's full-MCAD
student (an arm of jobs/bench/arms.py). Each KEY is one of:

- a TrainConfig field (`train_keys()`: w_rank, rank_by, itm_norm,
  itm_temperature, alpha, beta, kd_temperature, k_prime, w_con, w_dist,
  w_feat, ...), typed and checked as `mcad pipeline sweep` types its grid
  (jobs.sweep.parse_grid). seed, epochs, mode and the view policy (`FIXED`)
  stay the report's, so each pair differs in the levers only;
- the teacher pass's `pools` (`PASS_KEYS`: consecutive or neighbours). The
  report's own pass used consecutive pools, so `pools=consecutive` is its
  store and adds no pass.

An unknown key, a bad value, a name used twice, a reference's name, or an
arm that changes nothing is refused in one line before anything is written.
One arm can change one factor on top of full MCAD (`rank:w_rank=1`), or
several at once (`best:pools=neighbours,w_rank=1,itm_norm=pool`). Each value
is meant to have been chosen beforehand on seed 0's val split (`mcad bench
select`); here test is read once per seed and arm.

For every seed of the report (or its first K), the run does the following.
It makes the passes the arms need: one per distinct set of pass overrides,
into OUT/seed_N/store_<k=v,...>. An arm with only student keys has no pass
and trains from DIR/seed_N/store. Then the arms' students train side by side,
and each is evaluated once on test (arms.run_arms). Each arm is compared with
three of the same seed's runs in the report (`REFERENCES`):

- its full-MCAD student: what the lever adds;
- its dual-only KD student (`dual_kd`): the goal figure of issue #18, above
  KD from the dual teacher alone;
- its dual teacher's evaluation (`teacher_dual`): the second goal figure.

The comparison is the paired difference with a 95 % t-interval over seeds,
and per seed a paired bootstrap over the test queries (arms_tables.compare).
Full MCAD and dual-only KD are also compared with the dual teacher, and full
MCAD with dual-only KD, for context. Cost per arm: pass seconds and store
bytes per sample (an arm on the report's store gets the report's), and
student seconds.

Outputs: OUT/levers.json, OUT/levers.md (jobs/bench/levers_tables.py) and
OUT/levers_config.json. The config pins the report (its path and settings),
the full-MCAD student settings, and the overrides of every arm ever run in
OUT. An OUT made with another report or other settings is refused, and so is
an arm name that now means other overrides. A (seed, arm) whose
OUT/seed_N/result_<arm>.json exists is kept. An arm added later that shares a
kept arm's pass reuses its store.

    mcad bench levers --report report/ --out levers/ --arm rank:w_rank=1 --arm neighbours:pools=neighbours
    mcad bench levers --report /tmp/r --out /tmp/l --arm best:pools=neighbours,w_rank=1,itm_norm=pool --seeds 2

Nothing heavy (torch, pyarrow, Ray) is imported at module level.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from mcad.jobs.bench.arms import Arm, parse_seeds
from mcad.jobs.teacher_pass_job import TeacherPassJob
from mcad.storage.errors import InputError

CONFIG_NAME = "levers_config.json"
# The report's runs each arm is paired with, in the order compared (an earlier one is not compared again with
# a later one: that pair is shown the other way round), each with its ranks' name in DIR/seed_N/ranks/.
REFERENCES = {"teacher_dual": "teacher_dual", "dual_kd": "dual_kd", "mcad": "mcad"}
PASS_KEYS = ("pools",)                  # TeacherPassJob fields an arm may set
FIXED = ("seed", "epochs", "mode", "views")  # TrainConfig fields that stay the report's
PINNED = ("report", "report_config", "student")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def train_keys() -> tuple[str, ...]:
    """The TrainConfig fields an arm may set."""
    from mcad.student.config import TrainConfig

    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in FIXED)


def parse_arm(spec: str) -> Arm:
    """"NAME:KEY=V[,KEY=V...]" -> an Arm whose fields record its name and overrides (module doc)."""
    from mcad.jobs.sweep import parse_grid
    from mcad.storage.schema import POOL_MODES
    from mcad.student.config import TrainConfig

    name, sep, body = str(spec).partition(":")
    name = name.strip()
    if not sep or not NAME.fullmatch(name):
        raise InputError(f"--arm {spec!r}: expected NAME:KEY=V[,KEY=V...], NAME of letters, digits, '_', '-', '.'")
    if name in REFERENCES:
        raise InputError(f"--arm {name}: the name of a reference ({', '.join(REFERENCES)}); choose another")
    allowed = (*PASS_KEYS, *train_keys())
    passes, train = {}, {}
    for item in [p.strip() for p in body.split(",") if p.strip()]:
        key, eq, value = (x.strip() for x in item.partition("="))
        key = key.replace("-", "_")
        if not eq or not key or not value:
            raise InputError(f"--arm {name}: {item!r} is not KEY=V")
        if key in passes or key in train:
            raise InputError(f"--arm {name}: {key} given twice")
        if key in FIXED:
            raise InputError(f"--arm {name}: {key} is the report's ({', '.join(FIXED)} stay as the report ran "
                             f"them, so each pair differs in the levers only)")
        if key not in allowed:
            raise InputError(f"--arm {name}: unknown key {key!r}; choose from {', '.join(allowed)}")
        if key == "pools":
            if value not in POOL_MODES:
                raise InputError(f"--arm {name}: pools must be one of {', '.join(POOL_MODES)}, got {value!r}")
            passes[key] = value
            continue
        try:
            train[key] = parse_grid([f"{key}={value}"])[key][0]
        except InputError as exc:
            raise InputError(f"--arm {name}: {exc}") from None
    try:
        TrainConfig(**train)  # a combination TrainConfig refuses (every loss weight 0)
    except InputError as exc:
        raise InputError(f"--arm {name}: {exc}") from None
    # The report's pass ran with TeacherPassJob's defaults: an override equal to one is its own store.
    passes = {k: v for k, v in passes.items() if v != getattr(TeacherPassJob, k)}
    if not passes and not train:
        raise InputError(f"--arm {spec!r}: it changes nothing of the report's full MCAD; give KEY=V")
    return Arm(name, passes=passes, train=train, fields={"arm": name, "passes": passes, "overrides": train})


def arm_spec(arm: Arm) -> str:
    """The canonical --arm text of an arm."""
    return f"{arm.name}:" + ",".join(f"{k}={v}" for k, v in {**arm.passes, **arm.train}.items())


@dataclass(frozen=True)
class LeversBenchConfig:
    report: str = "report"
    out: str = "levers_out"
    arms: tuple[str, ...] = ()   # NAME:KEY=V[,KEY=V...] each
    seeds: str = "all"           # "all": every seed of the report; K: the first K
    ray_address: str | None = None

    def __post_init__(self):  # canonical spellings: bad specs are refused here, before any work
        arms = [parse_arm(s) for s in self.arms]
        if not arms:
            raise InputError("give at least one --arm NAME:KEY=V[,KEY=V...]")
        names = [a.name for a in arms]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InputError(f"--arm: {', '.join(twice)} named twice")
        same = [(a.name, b.name) for i, a in enumerate(arms) for b in arms[i + 1:]
                if (a.passes, a.train) == (b.passes, b.train)]
        if same:
            raise InputError(f"--arm: {same[0][0]} and {same[0][1]} change the same settings")
        object.__setattr__(self, "arms", tuple(arm_spec(a) for a in arms))
        object.__setattr__(self, "seeds", parse_seeds(self.seeds))

    def arm_list(self) -> list[Arm]:
        return [parse_arm(s) for s in self.arms]

    def command(self) -> str:
        """The command line that runs this configuration."""
        extra = f" --ray-address {self.ray_address}" if self.ray_address else ""
        arms = "".join(f" --arm {s}" for s in self.arms)
        return f"mcad bench levers --report {self.report} --out {self.out}{arms} --seeds {self.seeds}{extra}"


def _definitions(out: Path, before: dict, arms: list[Arm]) -> dict:
    """Every arm ever run in OUT -> its overrides; refused when a name now means other overrides."""
    now = json.loads(json.dumps({a.name: {"passes": a.passes, "train": a.train} for a in arms}))
    for name, spec in now.items():
        if name in before and before[name] != spec:
            raise InputError(f"{out}: arm {name} was run with {before[name]}, now {spec}; give the new one "
                             f"another name or use another --out")
    return {**before, **now}


def run_levers_bench(cfg: LeversBenchConfig, *, echo=print) -> dict:
    """Every arm on every seed, the comparison and the tables into cfg.out; returns levers.json's dict."""
    from mcad.jobs.bench.arms import check_config, open_report, report_pins, report_row, run_arms, write_outputs
    from mcad.jobs.bench.arms_tables import compare
    from mcad.jobs.bench.levers_tables import markdown
    from mcad.jobs.bench.machine import machine_info
    from mcad.storage.atomic import atomic_write_json

    report, out, arms = Path(cfg.report), Path(cfg.out), cfg.arm_list()
    demos = open_report(report, cfg.seeds, cfg.ray_address, "levers", tuple(REFERENCES.values()))
    seeds = list(demos)
    pins = report_pins(report, demos[0], "levers")
    before = check_config(out / CONFIG_NAME, pins, PINNED, "levers")
    defined = _definitions(out, before.get("arms", {}), arms)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_NAME, {**pins, "arms": defined, "seeds": cfg.seeds,
                                          "ray_address": cfg.ray_address})
    t0 = time.perf_counter()
    runs, kept = {}, {}
    for s in seeds:
        trained, kept[s] = run_arms(demos[s], arms, out / f"seed_{s}", echo=echo, tag=f"levers seed {s}")
        runs[s] = {**{name: report_row(report / f"seed_{s}", name) for name in REFERENCES}, **trained}
    result = {"command": cfg.command(), "config": dataclasses.asdict(cfg), "pinned": pins, "seeds": seeds,
              "arms": {a.name: {"passes": a.passes, "overrides": a.train, "spec": arm_spec(a)} for a in arms},
              "references": list(REFERENCES), **compare(report, out, seeds, runs, REFERENCES),
              "per_seed": {str(s): runs[s] for s in seeds}, "kept": {str(s): kept[s] for s in seeds},
              "machine": machine_info(), "seconds": round(time.perf_counter() - t0, 2)}
    return write_outputs(out, "levers", result, markdown, echo=echo, tag="levers")
