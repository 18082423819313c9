"""`mcad signals ...`: inspect a signal store with DuckDB (stats, validate, sql).

The commands are thin: the SQL lives in storage/query.py. Bad input (not a
store, a broken store, a bad query) exits with code 2 and one line.
"""
from __future__ import annotations

import json
import sys

import click

STATS_EPILOG = """\b
Examples:
  mcad signals stats out/store
  mcad signals stats out/store --json out/store-stats.json
  mcad signals stats out/store --plot store-stats.png     histograms of top-1 and entropy, rejects
"""
VALIDATE_EPILOG = """\b
Examples:
  mcad signals validate out/store
  mcad signals validate out/store --data 'data/shapes/train-{00000..00003}.tar'
  mcad signals validate out/store --data data/shapes/train/
  mcad signals validate out/store --quick          footers and rows only: no digests, no page decoding
"""
SQL_EPILOG = """\b
Examples:
  mcad signals sql out/store "SELECT shard, count(*) AS rows FROM signals GROUP BY shard"
  mcad signals sql out/store "SELECT reason, count(*) FROM rejects GROUP BY reason" --csv
  mcad signals sql out/store "SELECT key, i2t_dual[1] AS top FROM signals" --json --limit 5
  mcad signals sql out/store "SELECT * FROM shards WHERE status <> 'done'"
  mcad signals sql out/store "SELECT view, avg(box[3] - box[1]) AS width FROM views GROUP BY view"

\b
Views: signals (one row per kept sample), rejects (key, reason, detail, shard),
shards (the manifest's shard entries), and in a store with views (schema v2)
views (one row per kept sample and view 1..N-1: box, img_emb, ...).
"""
GROUP_EPILOG = """\b
Examples:
  mcad signals stats out/store
  mcad signals validate out/store --data data/shapes/train/
  mcad signals sql out/store "SELECT count(*) FROM signals"
"""
_MAX_SHARD_LINES = 40  # the stats table shows this many shards; --json has them all


@click.group(epilog=GROUP_EPILOG)
def signals():
    """Inspect a signal store with DuckDB: summary stats, full validation, ad-hoc SQL."""


@signals.command(epilog=STATS_EPILOG)
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the figures as JSON to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also draw histograms of the top-1 probability and entropy per teacher and direction, at "
                   "T = 1 and at the default distillation temperature, and the rejects by reason, as a PNG.")
def stats(store: str, json_path: str | None, plot_path: str | None):
    """Per-shard counts, rejects by reason, teachers, how peaked the stored candidate
    distributions are (mean top-1 probability and entropy, per direction), views per sample
    and the store's bytes per sample by table."""
    from mcad.storage.atomic import atomic_write_json
    from mcad.storage.query import candidate_histograms, connect, store_stats
    from mcad.storage.reader import open_store

    opened = open_store(store, allow_incomplete=True)
    result = store_stats(opened)
    click.echo(format_stats(result))
    if plot_path:
        from mcad.jobs.signals_plot import plot_signal_stats
        from mcad.student.config import TrainConfig

        result["histograms"] = candidate_histograms(connect(opened), k=opened.dims["k"],
                                                    temperatures=(1.0, TrainConfig.kd_temperature))
        click.echo(f"plot -> {plot_signal_stats(result, result['histograms'], plot_path)}")
    if json_path:
        atomic_write_json(json_path, result)


@signals.command(epilog=VALIDATE_EPILOG)
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--data", default=None,
              help="The input shards (folder, glob, brace pattern or list file): check that each "
                   "shard's keys are exactly the store's kept rows plus its rejects, in order.")
@click.option("--quick", is_flag=True,
              help="Skip the digests and the decoding of every page (for very large stores): "
                   "footers, schema, counts and the rows' consistency only.")
def validate(store: str, data: str | None, quick: bool):
    """Check a store: the sha256 of the manifest and of every file, every column of every
    file decoded with its page checksums verified, manifest against files, schema, counts,
    the rows' own consistency, with views the view table (N views per kept row, none
    missing, boxes inside [0, 1]), and with --data, the keys against the input shards.
    The first failure is one line naming the file and column. Exit 0 when valid, 2 otherwise."""
    from tqdm import tqdm

    from mcad.storage.checks import check_store, check_views
    from mcad.storage.integrity import NOT_RECORDED, check_integrity
    from mcad.storage.reader import open_store

    opened = open_store(store)
    checked, unchecked = ["manifest", "schema", "counts", "rows"], []
    if not quick:
        def bar(names):
            return tqdm(names, desc="digests and pages", unit="shard", file=sys.stderr, disable=len(names) < 2)

        integrity = check_integrity(opened, progress=bar)  # signals, rejects and view files
        checked += ["digests", "page checksums"]
        unchecked = [name.replace("_", " ").replace("proj", "projection")
                     for name in ("manifest_digest", "file_digests", "fusion_proj_digest")
                     if integrity[name] == NOT_RECORDED]
    summary = check_store(opened)
    views = check_views(opened)
    if views["views"] > 1:
        checked.insert(4, "view table")
    if data is not None:
        _check_data(opened, data)
        checked.append("data keys")
    per_sample = f", {views['views']} views per sample" if views["views"] > 1 else ""
    click.echo(f"ok: {summary['shards']} shards, {summary['rows']} rows, {summary['pools']} pools, "
               f"{summary['rejected']} rejected{per_sample} ({', '.join(checked)})")
    if unchecked:
        click.echo(f"note: this store records no {', no '.join(unchecked)} (written before 2026-12-01), "
                   f"so its files cannot be checked against the teacher pass; pages were decoded")


def _check_data(store, spec: str) -> None:
    from tqdm import tqdm

    from mcad.pipeline.shard_list import list_shards, shard_name

    from mcad.pipeline.shards import iter_shard
    from mcad.storage.errors import InputError
    from mcad.storage.checks import check_data_keys

    paths = {shard_name(p): p for p in list_shards(spec)}
    missing = sorted(set(store.shards) - set(paths))
    extra = sorted(set(paths) - set(store.shards))
    if missing or extra:
        side = (f"store shard {missing[0]} is not in the data" if missing
                else f"data shard {extra[0]} is not in the store")
        raise InputError(f"{side} ({len(missing)} store shard(s) without data, "
                         f"{len(extra)} data shard(s) without signals)")
    for name in tqdm(store.shards, desc="data keys", unit="shard", file=sys.stderr,
                     disable=len(store.shards) < 2):
        check_data_keys(store, name, (item.key for item in iter_shard(paths[name])))


@signals.command(epilog=SQL_EPILOG)
@click.argument("store", type=click.Path(file_okay=False))
@click.argument("query")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (header line first).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, one object per row.")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Print at most N rows.")
def sql(store: str, query: str, as_csv: bool, as_json: bool, limit: int | None):
    """Run a DuckDB query over the views signals, rejects and shards; print a table, CSV or JSON lines."""
    import duckdb

    from mcad.storage.query import connect, sql, sql_error
    from mcad.storage.errors import InputError
    from mcad.storage.reader import open_store

    if as_csv and as_json:
        raise InputError("--csv and --json exclude each other")
    opened = open_store(store, allow_incomplete=True)
    con = connect(opened)
    rel = sql(con, query, limit=limit)
    try:
        if rel is None:  # a statement without a result (CREATE, SET, ...)
            click.echo("ok")
        elif as_csv or as_json:
            _print_rows(rel, as_json=as_json)
        else:
            click.echo(str(rel))
    except duckdb.Error as exc:  # errors found only when the query runs
        raise sql_error(exc) from None


def _print_rows(rel, *, as_json: bool) -> None:
    """Stream a relation's rows as CSV or JSON lines (non-finite floats as Infinity/NaN, as DuckDB does)."""
    import csv

    out = click.get_text_stream("stdout")
    writer = None if as_json else csv.writer(out, lineterminator="\n")
    if writer:
        writer.writerow(rel.columns)
    for batch in rel.arrow():
        for row in batch.to_pylist():
            if writer:
                writer.writerow(row.values())
            else:
                out.write(json.dumps(row, default=str) + "\n")


# --- stats formatting -------------------------------------------------------


def format_stats(s: dict) -> str:
    """The stats dict as a few aligned tables."""
    p = s["params"]
    dims = " ".join(f"{k}={p[k]}" for k in ("pool_size", "k", "d", "f") if k in p)
    lines = [f"store {s['store']}  (schema v{s['schema_version']}, mcad {s['mcad_version']})  {dims}", ""]
    lines += ["teachers:"] + _table(["role", "path", "config sha256", "weights sha256"], [
        [role, t.get("path", "?"), _short(t.get("config_sha256")), _short(t.get("weights_sha256"))]
        for role, t in sorted(s["teachers"].items())])
    shards = s["shards"]
    rows = [[x["shard"], x["rows"], x["rejected"], x["pools"]] for x in shards[:_MAX_SHARD_LINES]]
    if len(shards) > _MAX_SHARD_LINES:
        rows.append([f"... {len(shards) - _MAX_SHARD_LINES} more (see --json)", "", "", ""])
    rows.append(["total", s["rows"], s["rejected"], s["pools"]])
    lines += ["", "shards:"] + _table(["shard", "rows", "rejected", "pools"], rows)
    if s["unfinished_shards"]:
        lines.append(f"  not finished: {len(s['unfinished_shards'])} shard(s), e.g. {s['unfinished_shards'][0]}")
    lines += ["", "rejects by reason:"]
    lines += _table(["reason", "count"], [[r, n] for r, n in s["rejects_by_reason"].items()]) \
        if s["rejects_by_reason"] else ["  (none)"]
    if "views" in s:
        v, b = s["views"], s["bytes_per_sample"]
        crops = (f"; crops: area {v['crop_scale'][0]:g}-{v['crop_scale'][1]:g}, ratio {v['crop_ratio'][0]:.3g}-"
                 f"{v['crop_ratio'][1]:.3g}, seed {v['seed']}" if v["per_sample"] > 1 else "")
        scored = (f"the first {v['single_scored']} scored by the single teacher" if v["per_sample"] > 1
                  else "the whole image: a store without views")
        lines += ["", f"views per sample: {v['per_sample']} ({scored}){crops}",
                  "store bytes per sample: " + ", ".join(f"{k} {_bytes(x)}" for k, x in b.items())]
    lines += ["", "candidate distributions (softmax over the K stored logits, padding excluded):"]
    cand = s["candidates"]
    lines += _table(["direction", "logits", "mean top-1 p", "mean entropy (nats)", "top-K share of pool mass"], [
        [dr, short, _num(c[short]["top1"]), _num(c[short]["entropy"]),
         _num(c["topk_mass"]) if short == "dual" else ""]
        for dr, c in cand.items() for short in ("dual", "itm")])
    return "\n".join(lines)


def _table(headers: list[str], rows: list[list]) -> list[str]:
    """Indented, aligned lines: text left-aligned, numbers right-aligned."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] == "" for r in rows) for i in range(len(headers))]
    out = []
    for r in cells:
        out.append("  " + "  ".join(c.rjust(w) if num else c.ljust(w)
                                    for c, w, num in zip(r, widths, numeric)).rstrip())
    return out


def _bytes(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _short(digest) -> str:
    return "?" if not digest else digest[:12]
