"""`mcad bench ...`: benchmarks that print ratios measured in one run (never tests).

The click layer only: each command builds its bench's config dataclass
(defaults read from it, see jobs/cli/options.py), calls the bench's run
function in jobs/bench/, prints its table and writes its JSON.
"""
from __future__ import annotations

import functools

import click

from mcad.jobs.cli.options import IntList, field_option, report_to_option

STORE = functools.partial(field_option, "mcad.jobs.bench.store:StoreBenchConfig")
STUDENT = functools.partial(field_option, "mcad.jobs.bench.student:StudentBenchConfig")
TEACHER_PASS = functools.partial(field_option, "mcad.jobs.bench.teacher_pass:TeacherPassBenchConfig")
PRESETS = functools.partial(field_option, "mcad.jobs.bench.presets:PresetsBenchConfig")
SWEEP = functools.partial(field_option, "mcad.jobs.bench.sweep:SweepBenchConfig")
INPUT = functools.partial(field_option, "mcad.jobs.bench.input:InputBenchConfig")
REPORT = functools.partial(field_option, "mcad.jobs.bench.report:ReportConfig")
VIEWS = functools.partial(field_option, "mcad.jobs.bench.views:ViewsBenchConfig")
LEVERS = functools.partial(field_option, "mcad.jobs.bench.levers:LeversBenchConfig")
SIZES = click.Choice(["smoke", "demo", "base", "large"])  # pipeline.shapes.teacher_models.TEACHER_SIZES

# Options several benches take.
json_option = click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                           help="Write the figures as JSON to this file.")


def dir_option(what: str):
    return click.option("--dir", "workdir", type=click.Path(file_okay=False, exists=True), default=None,
                        help=f"Where to put the temporary {what} (default: the system temp folder).")


def ray_address_option(help: str = "Existing cluster ('auto', 'ray://host:port'); default: a local one."):
    return click.option("--ray-address", default=None, help=help)


def _emit(table: str, result: dict, json_path: str | None) -> None:
    """Print a bench's table; write its JSON dict when asked."""
    from mcad.storage.atomic import atomic_write_json

    click.echo(table)
    if json_path:
        atomic_write_json(json_path, result)
        click.echo(f"wrote {json_path}")


@click.group()
def bench():
    """Measure speed and size; print ratios measured in one run, write --json."""


@bench.command(epilog="""\b
Examples:
  mcad bench store                               20k rows, D=F=256, K=32, P=256
  mcad bench store --json bench-store.json --rows 100000 --shards 10
""")
@json_option
@STORE("--rows", type=click.IntRange(min=1), help="Rows in the synthetic store.")
@STORE("--shards", type=click.IntRange(min=1), help="Shards (Parquet files) the rows are split over.")
@dir_option("store")
def store(json_path: str | None, rows: int, shards: int, workdir: str | None):
    """Signal store size on disk against its raw payload, and reader speed (rows/s as torch tensors)."""
    import json

    from mcad.jobs.bench.store import StoreBenchConfig, run_store_bench
    from mcad.storage.atomic import atomic_write_json

    result = run_store_bench(StoreBenchConfig(rows=rows, shards=shards), workdir=workdir)
    click.echo(json.dumps(result, indent=2))
    if json_path:
        atomic_write_json(json_path, result)


@bench.command("student", epilog="""\b
Examples:
  mcad bench student --json bench-student.json      builds a store: demo teachers, 512 samples
  mcad bench student --size smoke --steps 5         seconds, for a quick look
  mcad bench student --store store/ --data data/shapes/train --teachers t/dual t/single
""")
@json_option
@click.option("--store", type=click.Path(file_okay=False, exists=True), default=None,
              help="An existing signal store (default: build one in a temporary folder).")
@click.option("--data", type=click.Path(exists=True), default=None,
              help="With --store: the training shards the store was made from.")
@click.option("--teachers", nargs=2, type=click.Path(file_okay=False, exists=True), default=None,
              help="With --store: the dual and single teacher dirs (default: the store's own paths).")
@STUDENT("--preset", type=str, help="Student size preset.")
@STUDENT("--steps", type=click.IntRange(min=1), help="Timed steps per variant (after the untimed warm-up steps).")
@STUDENT("--size", type=SIZES, help="Teacher size of a built store (random weights): demo is the realistic width.")
@STUDENT("--threads", type=click.IntRange(min=0),
         help="Torch threads while timing (0: torch's default, usually every core).")
@dir_option("data, teachers and store")
@ray_address_option("Ray cluster for a built store's teacher pass (default: a local one started once).")
def student_bench(json_path, store, data, teachers, preset, steps, size, threads, workdir, ray_address):
    """Ms per training step: plain contrastive, MCAD from the store, MCAD with teachers online."""
    from mcad.jobs.bench.student import StudentBenchConfig, format_table, run_student_bench
    from mcad.student.models import get_preset

    get_preset(preset)  # an unknown preset fails before anything is built
    cfg = StudentBenchConfig(preset=preset, steps=steps, size=size, threads=threads)
    result = run_student_bench(cfg, store=store, data=data, teachers=teachers or None, workdir=workdir,
                               ray_address=ray_address)
    _emit(format_table(result), result, json_path)


@bench.command("teacher-pass", epilog="""\b
Examples:
  mcad bench teacher-pass --json bench-teacher-pass.json     demo teachers, 512 samples, 4 shards
  mcad bench teacher-pass --size smoke --samples 40 --pool 8 --topk 3
  mcad bench teacher-pass --profile --size base --samples 16 --shards 1 --pool 16 --topk 12
                                                         seconds and FLOPs per stage, ITM cache on/off
  mcad bench teacher-pass --size base --device cuda --samples 512 --shards 2 --pool 64 --topk 16
                                                         the profile on a GPU: samples/s, pairs/s, MFU
""")
@json_option
@TEACHER_PASS("--size", type=SIZES, help="Teacher size (random weights): demo is the shipped teachers' width; "
              "base and large the public CLIP ViT-B/16 + BLIP ITM base, CLIP ViT-L/14 + BLIP ITM large.")
@TEACHER_PASS("--samples", type=click.IntRange(min=1), help="Samples in the synthetic data.")
@TEACHER_PASS("--shards", type=click.IntRange(min=1), help="Input shards the samples are split over.")
@TEACHER_PASS("--pool", "pool_size", type=click.IntRange(min=2), help="Pool size P of the pass.")
@TEACHER_PASS("--topk", type=click.IntRange(min=1), help="Candidates K per sample and direction.")
@click.option("--profile", is_flag=True,
              help="Instead of the Ray comparison: seconds, share and FLOPs per stage of the bare loop, "
                   "with the single teacher's cross-attention cache and without it (no Ray).")
@click.option("--device", default="cpu", show_default=True,
              help="Where the profile runs the teachers: cpu, cuda or cuda:N (cuda implies --profile).")
@click.option("--dtype", default=None, metavar="DTYPE",
              help="The profile's teacher dtype: bfloat16, float16 or float32 "
                   "[default: bfloat16 on CUDA (float16 without it), float32 on CPU].")
@click.option("--peak-tflops", type=click.FloatRange(min=0, min_open=True), default=None,
              help="The device's dense peak TFLOP/s for MFU [default: the table of accelerators; n/a on CPU].")
@dir_option("data, teachers and stores")
@ray_address_option("Ray cluster to join (default: a local cluster started on the spot). The "
                    "comparison with the bare loop only holds when that cluster is this machine.")
def teacher_pass_bench(json_path, size, samples, shards, pool_size, topk, profile, device, dtype, peak_tflops,
                       workdir, ray_address):
    """Samples/s of the Ray teacher pass against a bare loop on the same cores, and 2 workers against 1;
    with --profile, where the pass's time goes (samples/s, pairs/s and MFU per stage)."""
    from mcad.jobs.bench.teacher_pass import TeacherPassBenchConfig, format_table, run_teacher_pass_bench
    from mcad.storage.errors import InputError

    cfg = TeacherPassBenchConfig(size=size, samples=samples, shards=shards, pool_size=pool_size, topk=topk)
    if profile or device != "cpu":
        from mcad.jobs.bench.teacher_profile import format_profile, run_profile

        # run_profile refuses a missing device and a bad dtype in one line, before anything is built.
        result = run_profile(cfg, device=device, dtype=dtype,
                             peak_flop_per_s=None if peak_tflops is None else peak_tflops * 1e12, workdir=workdir)
        _emit(format_profile(result), result, json_path)
        return
    if dtype is not None or peak_tflops is not None:
        raise InputError("--dtype and --peak-tflops are options of the profile: add --profile")
    result = run_teacher_pass_bench(cfg, workdir=workdir, ray_address=ray_address)
    _emit(format_table(result), result, json_path)


@bench.command("presets", epilog="""\b
Examples:
  mcad bench presets --json bench-presets.json        every preset, the shipped demo teachers
  mcad bench presets --presets s --queries 20         one preset, fewer timed queries
  mcad bench presets --presets smoke --gallery 1000 --batches 1 --queries 5   seconds
""")
@json_option
@PRESETS("--teachers", type=click.Path(exists=True, file_okay=False), show_default="the shipped demo teachers",
         help="A folder with dual/ and single/.")
@click.option("--presets", "presets", default="", help="Comma-separated presets (default: all).")
@PRESETS("--batch", type=click.IntRange(min=1), help="Images / captions per timed batch.")
@PRESETS("--batches", type=click.IntRange(min=1), help="Timed batches per direction (median), after untimed ones.")
@PRESETS("--gallery", type=click.IntRange(min=1), help="Images in the search gallery of the latency figure.")
@PRESETS("--queries", type=click.IntRange(min=1), help="Timed queries (median) of the latency figure.")
@PRESETS("--threads", type=click.IntRange(min=0), help="Torch threads while timing (0: torch's default).")
def presets_bench(json_path, teachers, presets, batch, batches, gallery, queries, threads):
    """Params, FLOPs, images/s, captions/s and 10k-gallery search latency of presets and teachers."""
    from mcad.jobs.bench.presets import PresetsBenchConfig, format_table, run_presets_bench

    names = tuple(p.strip() for p in presets.split(",") if p.strip())
    cfg = PresetsBenchConfig(teachers=teachers, presets=names, batch=batch, batches=batches,
                             gallery=gallery, queries=queries, threads=threads)
    result = run_presets_bench(cfg)
    _emit(format_table(result), result, json_path)


@bench.command("sweep", epilog="""\b
Examples:
  mcad bench sweep --json bench-sweep.json            2 trials x 2 epochs each way, demo-size teachers
  mcad bench sweep --trials 4 --parallel 2 --epochs 2
  mcad bench sweep --size smoke --preset smoke --samples 128 --pool 32    a quick look
""")
@json_option
@SWEEP("--trials", type=click.IntRange(min=1), help="Grid points of each sweep.")
@SWEEP("--epochs", type=click.IntRange(min=1), help="Epochs per trial.")
@SWEEP("--parallel", type=click.IntRange(min=1), help="Trials at once.")
@SWEEP("--preset", type=str, help="Student size preset.")
@SWEEP("--size", type=SIZES, help="Teacher size of the built store (random weights).")
@SWEEP("--samples", type=click.IntRange(min=1), help="Training samples of the built store.")
@SWEEP("--pool", "pool_size", type=click.IntRange(min=2), help="Pool size P of the built store.")
@SWEEP("--topk", type=click.IntRange(min=1), help="Candidates K of the built store.")
@dir_option("data, teachers, store and sweeps")
@ray_address_option()
def sweep_bench(json_path, workdir, ray_address, **options):
    """Trials per hour of a sweep from one store against the same sweep with teachers online."""
    from mcad.jobs.bench.sweep import SweepBenchConfig, format_table, run_sweep_bench
    from mcad.student.models import get_preset

    get_preset(options["preset"])
    result = run_sweep_bench(SweepBenchConfig(**options), workdir=workdir, ray_address=ray_address)
    _emit(format_table(result), result, json_path)


@bench.command("input", epilog="""\b
Examples:
  mcad bench input --json bench-input.json       1024 photo-like 640x480 samples, demo teachers, preset s
  mcad bench input --samples 64 --image-size 96 --pool 16 --topk 4 --epochs 1 --per-worker 32   a quick look
""")
@json_option
@INPUT("--teachers", type=click.Path(exists=True, file_okay=False), show_default="the shipped demo teachers",
       help="A folder with dual/ and single/.")
@INPUT("--samples", type=click.IntRange(min=1), help="Photo-like training samples (mcad data synth --texture photo).")
@INPUT("--image-size", type=click.IntRange(min=24), help="Their height in pixels (width 4/3 of it).")
@INPUT("--shard-size", type=click.IntRange(min=1), help="Samples per shard.")
@INPUT("--pool", "pool_size", type=click.IntRange(min=2), help="Pool size P of the store (a student batch).")
@INPUT("--topk", type=click.IntRange(min=1), help="Candidates K of the store.")
@INPUT("--preset", type=str, help="Student size preset.")
@INPUT("--epochs", type=click.IntRange(min=1), help="Timed student epochs per loader variant.")
@INPUT("--per-worker", type=click.IntRange(min=1), help="Samples timed for each per-worker input rate.")
@INPUT("--host-cores", type=click.IntRange(min=1), help="Cores of the GPU host the per-core rates are scaled to.")
@dir_option("data and store")
@ray_address_option("Ray cluster for the store's teacher pass (default: a local one started once).")
def input_bench(json_path, workdir, ray_address, **options):
    """Input samples/s per worker (student and pass paths, decode options), student epochs with 0 and 2
    loader workers, the pass with and without the next pool prepared ahead, on photo-like shards."""
    from mcad.jobs.bench.input import InputBenchConfig, format_table, run_input_bench

    result = run_input_bench(InputBenchConfig(**options), workdir=workdir, ray_address=ray_address)
    _emit(format_table(result), result, json_path)


@bench.command("report", epilog="""\b
Examples:
  mcad bench report --out report/                 5 seeds, demo sizes, speed benches (about 16 min a seed on 2 CPU cores)
  mcad bench report --out /tmp/r --quick --seeds 2 --skip-speed    the same flow, small (a few minutes)
  mcad bench report --out report/ --seeds 3       the first 3 seeds (a later --seeds 5 adds seeds 3 and 4)
""")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Report folder (seeds already finished in it are kept).")
@REPORT("--seeds", type=click.IntRange(min=1), help="Seeds 0 .. N-1, one teacher pass each.")
@click.option("--quick", is_flag=True, help="The demo's quick sizes, and small speed benches.")
@REPORT("--epochs", type=click.IntRange(min=1), help="Student epochs (default: the demo's).")
@REPORT("--preset", type=str, help="Student size preset.")
@REPORT("--teachers", type=click.Path(exists=True, file_okay=False), show_default="the shipped demo teachers",
        help="A folder with dual/ and single/.")
@click.option("--skip-speed", is_flag=True, help="Quality and cost only: no speed benches.")
@ray_address_option("Run the teacher passes and the students on this cluster ('auto', 'ray://host:port'); "
                    "default: a local one.")
@report_to_option("every student run, OUT/seed_N/runs/<student>/tensorboard/ (tensorboard --logdir OUT)")
def report_cmd(out, seeds, quick, epochs, preset, teachers, skip_speed, ray_address, report_to):
    """Quality over seeds (teachers and six students), paired intervals, speed ratios and cost, as JSON,
    markdown and plots."""
    from mcad.jobs.bench.report import ReportConfig, run_report

    cfg = ReportConfig(out=out, seeds=seeds, quick=quick, epochs=epochs, preset=preset, teachers=teachers,
                       skip_speed=skip_speed, ray_address=ray_address, report_to=report_to)
    run_report(cfg, echo=click.echo)


@bench.command("views", epilog="""\b
Examples:
  mcad bench views --report report/ --out views/     every seed of the report: 4x1, 8x1, 4x2 at the range val chose
  mcad bench views --report report/ --out views/ --seeds 2 --settings 4x1    seeds 0 and 1, one setting
  mcad bench views --report /tmp/r --out /tmp/v --crop-scales 0.3-1,0.8-1 --json /tmp/views.json
""")
@click.option("--report", required=True, type=click.Path(file_okay=False, exists=True),
              help="A `mcad bench report` folder: each seed's benchmark, teachers and one-view full-MCAD "
                   "student are reused (the reference of every setting).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Views folder (the selection runs and (seed, setting) results already in it are kept).")
@VIEWS("--settings", type=str, help="Views NxM measured on test: N views per sample, the first M scored by "
       "the single teacher.")
@VIEWS("--crop-scales", type=str, help="Candidate crop-scale ranges LO-HI (shares of the image area); the one "
       "with the higher val rsum at 4x1 on seed 0 is used.")
@VIEWS("--seeds", type=str, help="'all': every seed of the report; K: the first K.")
@ray_address_option("Run the teacher passes and the students on this cluster ('auto', 'ray://host:port'); "
                    "default: a local one.")
@json_option
def views_cmd(report, out, settings, crop_scales, seeds, ray_address, json_path):
    """Stored views (crops, schema v2) against one view: caption truth of crop ranges, the range chosen on
    val, then full-MCAD students from NxM views paired with the report's one-view student on test."""
    from mcad.jobs.bench.views import ViewsBenchConfig, run_views_bench
    from mcad.jobs.bench.views_tables import summary_text

    cfg = ViewsBenchConfig(report=report, out=out, settings=settings, crop_scales=crop_scales, seeds=seeds,
                           ray_address=ray_address)
    result = run_views_bench(cfg, echo=click.echo)
    _emit(summary_text(result), result, json_path)


@bench.command("levers", epilog="""\b
Examples:
  mcad bench levers --report report/ --out levers/ --arm rank:w_rank=1 --arm neighbours:pools=neighbours
  mcad bench levers --report report/ --out levers/ --arm best:pools=neighbours,w_rank=1,itm_norm=pool --seeds 2
  mcad bench levers --report /tmp/r --out /tmp/l --arm t:itm_temperature=2 --json /tmp/levers.json
""")
@click.option("--report", required=True, type=click.Path(file_okay=False, exists=True),
              help="A `mcad bench report` folder: each seed's benchmark, teachers, store, full-MCAD and dual-only "
                   "KD students and dual-teacher evaluation are reused (the references of every arm).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Levers folder (the (seed, arm) results already in it are kept).")
@click.option("--arm", "arms", multiple=True, required=True, metavar="NAME:KEY=V[,KEY=V...]",
              help="A variant of the report's full MCAD: KEY a TrainConfig field (w_rank, rank_by, itm_norm, "
                   "itm_temperature, alpha, beta, ...) or the pass's pools (neighbours: a new pass per seed). "
                   "Repeat for more arms.")
@LEVERS("--seeds", type=str, help="'all': every seed of the report; K: the first K.")
@ray_address_option("Run the teacher passes and the students on this cluster ('auto', 'ray://host:port'); "
                    "default: a local one.")
@json_option
def levers_cmd(report, out, arms, seeds, ray_address, json_path):
    """The single-teacher levers (issue #18) on test: one full-MCAD student per arm and seed, paired with the
    report's full MCAD, dual-only KD and dual teacher of that seed, with each arm's pass and store cost."""
    from mcad.jobs.bench.levers import LeversBenchConfig, run_levers_bench
    from mcad.jobs.bench.levers_tables import summary_text

    cfg = LeversBenchConfig(report=report, out=out, arms=tuple(arms), seeds=seeds, ray_address=ray_address)
    result = run_levers_bench(cfg, echo=click.echo)
    _emit(summary_text(result), result, json_path)


@bench.command("select", epilog="""\b
Examples:
  mcad bench select --store seed_0/store --data seed_0/data/train --val-data seed_0/data/val --out select/
  mcad bench select ... --factor kd_temperature=1,2,4 --factor beta=0,1 --epoch-budgets 6,10
  mcad bench select ... --out select/ --resume          continue; finished sweeps and trials are kept
""")
@click.option("--store", required=True, help="Signal store: a folder or a URI.")
@click.option("--data", required=True, help="The shards the store was made from.")
@click.option("--val-data", required=True, help="The val shards every choice is made on (test is never read).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Selection folder.")
@click.option("--factor", "factors", multiple=True, metavar="NAME=V1,V2,...",
              help="A setting and its values, chosen in the order given [default: temperature, alpha, beta, "
                   "K', w_dist, w_feat, as in docs/results/val-sweep].")
@click.option("--epoch-budgets", type=IntList(), default=None, metavar="E,E,...",
              help="Epoch budgets compared last, with every chosen setting [default: 6,10,15; '' skips].")
@field_option("mcad.jobs.bench.select:SelectConfig", "--epochs", type=click.IntRange(min=1),
              help="Epochs of every factor step.")
@field_option("mcad.jobs.bench.select:SelectConfig", "--parallel", type=click.IntRange(min=1),
              help="Trials at once.")
@field_option("mcad.jobs.bench.select:SelectConfig", "--grace-epochs", type=click.IntRange(min=1),
              help="Epochs before ASHA may stop a trial.")
@field_option("mcad.jobs.bench.select:SelectConfig", "--preset", type=str, help="Student size preset.")
@field_option("mcad.jobs.bench.select:SelectConfig", "--seed", type=int, help="Student seed.")
@ray_address_option()
@click.option("--resume", is_flag=True, help="Continue the selection in --out.")
def select_cmd(store, data, val_data, out, factors, epoch_budgets, epochs, parallel, grace_epochs, preset, seed,
               ray_address, resume):
    """Choose the student's settings on val, one factor at a time (one sweep each), then the epochs.

    Writes OUT/<step>-<factor>/results.csv per sweep, OUT/selection.json and
    OUT/selection.md (every trial, the winners, the rule). Test is never read.
    """
    from mcad.jobs.bench.select import FACTORS, EPOCH_BUDGETS, SelectConfig, parse_factors, run_select

    budgets = EPOCH_BUDGETS if epoch_budgets is None else epoch_budgets  # '' -> (): no epoch step
    cfg = SelectConfig(store=store, data=data, val_data=val_data, out=out,
                       factors=parse_factors(factors) if factors else FACTORS, epochs=epochs,
                       epoch_budgets=budgets, parallel=parallel, grace_epochs=grace_epochs, preset=preset,
                       seed=seed, ray_address=ray_address, resume=resume)
    selection = run_select(cfg, echo=click.echo)
    click.echo("chosen on val: " + ", ".join(f"{k} = {v}" for k, v in selection["chosen"].items()))
    click.echo(f"-> {out}/selection.json, {out}/selection.md")
