"""DuckDB over a signal store: the SQL behind `mcad signals stats|validate|sql`.

`connect(store)` gives an in-memory DuckDB connection with these views:

- `signals`: every row of the finished shards' signals files (read_parquet);
- `rejects`: every rejected sample (key, reason, detail) plus its `shard`
  (the rejects file's name);
- `shards`: the manifest's shard entries, one row per shard, finished or not;
- `views` (a store with views): every row of the view files.

    con = connect("out/store")
    con.sql("SELECT shard, count(*) FROM signals GROUP BY shard").fetchall()

`store_stats` summarises a store (counts, rejects, teachers, views, and how
peaked the stored candidate distributions are). The checks of `mcad signals
validate` over these views are in storage/checks.py. Every SQL string is
built from the column constants of storage/schema.py.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterable

import duckdb
import pyarrow as pa

from mcad.storage import fs
from mcad.storage import schema
from mcad.storage.errors import InputError, error_line
from mcad.storage.manifest import (
    MTIME, POOLS, REJECTED, ROWS, SECONDS, SHARD_FIELDS, SIZE, SOURCE, STATUS, STATUS_DONE, rejects_path,
    signals_path, views_path,
)
from mcad.storage.reader import Store, open_store
from mcad.storage.views import view_stats

SIGNALS_VIEW, REJECTS_VIEW, SHARDS_VIEW, VIEWS_VIEW = "signals", "rejects", "shards", "views"
# Candidate-list columns whose softmax `store_stats` describes, by short name.
LOGIT_FIELDS = {"dual": schema.DUAL, "itm": schema.ITM}


def connect(store: Store | str | os.PathLike) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views `signals`, `rejects` and `shards`.

    A path is opened with `open_store(..., allow_incomplete=True)`: shards a
    running pass has not finished yet appear in `shards` only.
    """
    store = store if isinstance(store, Store) else open_store(store, allow_incomplete=True)
    if fs.is_uri(store.path):  # DuckDB reads these files by path; remote reads need its httpfs extension
        raise InputError(f"{store.path}: `mcad signals` inspects a store on a local or mounted disk; "
                         f"copy it here first (e.g. `aws s3 sync` / `gsutil rsync`)")
    con = duckdb.connect()
    sig_files = [signals_path(store.path, name) for name in store.shards]
    rej_files = [rejects_path(store.path, name) for name in store.shards]
    if sig_files:
        con.sql(f"CREATE VIEW {SIGNALS_VIEW} AS SELECT * FROM read_parquet({file_list(sig_files)})")
        # The rejects schema has no shard column: the file name is the shard.
        con.sql(f"CREATE VIEW {REJECTS_VIEW} AS SELECT * EXCLUDE (filename), "
                f"parse_filename(filename, true) AS {schema.SHARD} "
                f"FROM read_parquet({file_list(rej_files)}, filename = true)")
    else:  # nothing finished yet: typed, empty views
        con.register(SIGNALS_VIEW, _as_read_by_duckdb(schema.signal_schema(**store.dims)).empty_table())
        con.register(REJECTS_VIEW, schema.REJECTS_SCHEMA.append(pa.field(schema.SHARD, pa.string())).empty_table())
    con.register(SHARDS_VIEW, _shards_table(store))
    if store.manifest.num_views > 1 and store.shards:  # schema v2: the view files too
        con.sql(f"CREATE VIEW {VIEWS_VIEW} AS SELECT * FROM "
                f"read_parquet({file_list([views_path(store.path, s) for s in store.shards])})")
    return con


def sql(con: duckdb.DuckDBPyConnection, query: str, *, limit: int | None = None):
    """Run a user's query; return its relation (None for statements without a result).

    Errors in parsing or binding become InputError with DuckDB's first line.
    """
    try:
        rel = con.sql(query)
    except duckdb.Error as exc:
        raise sql_error(exc) from None
    if rel is not None and limit is not None:
        rel = rel.limit(limit)
    return rel


def sql_error(exc: duckdb.Error) -> InputError:
    """One line out of DuckDB's message (it adds the query and a caret below)."""
    return InputError(f"SQL error: {error_line(exc, first=True)}")


# --- stats ------------------------------------------------------------------


def store_stats(store: Store | str | os.PathLike) -> dict[str, Any]:
    """Everything `mcad signals stats` shows, as a JSON-able dict.

    Keys: store, schema_version, mcad_version, params, teachers, rows,
    rejected, pools, shards (list of {shard, rows, rejected, pools}, finished
    shards, counted from the files), unfinished_shards, rejects_by_reason
    and candidates: per direction, for the `dual` and `itm` logits, the mean
    over rows of the top-1 probability and of the entropy (nats) of the
    softmax over the row's stored candidates (padding excluded), and
    `topk_mass`, the mean over rows of exp(logsumexp(dual over K) - dual_lse):
    the share of the row's pool-wide dual softmax mass its K candidates hold;
    and `views`, `bytes_per_sample` (storage/views.view_stats).
    """
    store = store if isinstance(store, Store) else open_store(store, allow_incomplete=True)
    con = connect(store)
    shards = fetch_rows(con.sql(
        f"WITH s AS (SELECT {schema.SHARD}, count(*) AS n, count(DISTINCT {schema.POOL}) AS p "
        f"           FROM {SIGNALS_VIEW} GROUP BY {schema.SHARD}), "
        f"r AS (SELECT {schema.SHARD}, count(*) AS n FROM {REJECTS_VIEW} GROUP BY {schema.SHARD}) "
        f"SELECT m.{schema.SHARD}, coalesce(s.n, 0) AS {ROWS}, coalesce(r.n, 0) AS {REJECTED}, "
        f"       coalesce(s.p, 0) AS {POOLS} "
        f"FROM {SHARDS_VIEW} m LEFT JOIN s ON s.{schema.SHARD} = m.{schema.SHARD} "
        f"LEFT JOIN r ON r.{schema.SHARD} = m.{schema.SHARD} "
        f"WHERE m.{STATUS} = '{STATUS_DONE}' ORDER BY m.{schema.SHARD}"))
    reasons = con.sql(f"SELECT {schema.REJECT_REASON}, count(*) FROM {REJECTS_VIEW} "
                      f"GROUP BY {schema.REJECT_REASON} ORDER BY count(*) DESC, {schema.REJECT_REASON}").fetchall()
    m = store.manifest
    return {
        "store": str(store.path),
        "schema_version": m.schema_version,
        "mcad_version": m.mcad_version,
        "params": m.params,
        "teachers": m.teachers,
        "rows": sum(s[ROWS] for s in shards),
        "rejected": sum(s[REJECTED] for s in shards),
        "pools": sum(s[POOLS] for s in shards),
        "shards": shards,
        "unfinished_shards": sorted(set(m.shards) - set(store.shards)),
        "rejects_by_reason": {reason: n for reason, n in reasons},
        "candidates": candidate_stats(con),
        **view_stats(store),  # views (per sample, ...) and bytes_per_sample by table: storage/views.py
    }


def candidate_stats(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, Any]]:
    """{direction: {"dual": {"top1", "entropy"}, "itm": {...}, "topk_mass"}} over the `signals` view.

    One scan: per row and logit column, l = the finite candidate logits,
    lse = max(l) + ln(sum(exp(l - max(l)))); top-1 probability
    exp(max(l) - lse); entropy lse - sum(exp(x - lse) * x). Means are None
    when the store has no rows.
    """
    rows, aliases = _per_row_sql()
    lses = ", ".join(f"{schema.col(dr, schema.DUAL_LSE)} AS {dr}_pool_lse" for dr in schema.DIRECTIONS)
    means = [f"avg({x}_{v}) AS {x}_{v}" for x in aliases for v in ("top1", "entropy")]
    means += [f"avg(exp({dr}_dual_lse - {dr}_pool_lse)) AS {dr}_topk_mass" for dr in schema.DIRECTIONS]
    got = fetch_rows(con.sql(f"{rows.format(extra=', ' + lses)} SELECT {', '.join(means)} FROM e"))[0]
    out: dict[str, dict[str, Any]] = {}
    for dr in schema.DIRECTIONS:
        out[dr] = {short: {"top1": got[f"{dr}_{short}_top1"], "entropy": got[f"{dr}_{short}_entropy"]}
                   for short in LOGIT_FIELDS}
        out[dr]["topk_mass"] = got[f"{dr}_topk_mass"]
    return out


def _per_row_sql(temperature: float = 1.0) -> tuple[str, list[str]]:
    """The CTEs (`WITH l, m, e`) that give, per row of `signals` and per direction and logit column
    (alias "<direction>_<dual|itm>"), the softmax of the finite candidate logits / T:
    `<alias>_top1` (top-1 probability), `<alias>_entropy` (nats) and `<alias>_lse` in `e`.
    `{extra}` in the text takes more columns of `signals` into `l` (str.format)."""
    t = float(temperature)
    names = [(dr, short, schema.col(dr, fld)) for dr in schema.DIRECTIONS for short, fld in LOGIT_FIELDS.items()]
    a = {c: f"{dr}_{short}" for dr, short, c in names}  # SQL aliases
    lists = ", ".join(f"list_transform(list_filter({c}::DOUBLE[], lambda x: isfinite(x)), lambda x: x / {t!r}) "
                      f"AS {a[c]}_l" for c in a)
    maxes = ", ".join(f"list_max({x}_l) AS {x}_m" for x in a.values())
    row_lse = ", ".join(f"{x}_m + ln(list_sum(list_transform({x}_l, lambda x: exp(x - {x}_m)))) AS {x}_lse"
                        for x in a.values())
    values = ", ".join(f"exp({x}_m - {x}_lse) AS {x}_top1, "
                       f"{x}_lse - list_sum(list_transform({x}_l, lambda x: exp(x - {x}_lse) * x)) AS {x}_entropy"
                       for x in a.values())
    rows = (f"WITH l AS (SELECT {lists}{{extra}} FROM {SIGNALS_VIEW}), "
            f"m AS (SELECT *, {maxes} FROM l), "
            f"r AS (SELECT *, {row_lse} FROM m), "
            f"e AS (SELECT *, {values} FROM r)")
    return rows, list(a.values())


def candidate_histograms(con: duckdb.DuckDBPyConnection, *, k: int, temperatures: Iterable[float] = (1.0,),
                         bins: int = 20) -> dict[str, Any]:
    """Histograms over rows of the top-1 probability and the entropy of each candidate softmax at each
    temperature T (logits / T, as the student's distillation sees them at that T).

    {"bins", "edges": {"top1": [0 .. 1], "entropy": [0 .. ln k]},
     "T=<t>": {direction: {"dual"|"itm": {"top1": [counts], "entropy": [counts]}}}}; rows without a
    finite candidate are not counted. One scan of `signals` per temperature."""
    hi = {"top1": 1.0, "entropy": math.log(max(k, 2))}
    out: dict[str, Any] = {"bins": bins, "edges": {v: [hi[v] * i / bins for i in range(bins + 1)] for v in hi}}
    for t in temperatures:
        rows, aliases = _per_row_sql(t)
        hists = ", ".join(f"histogram(least({bins - 1}, greatest(0, floor({x}_{v} / {hi[v]!r} * {bins})::INTEGER))) "
                          f"AS {x}_{v}" for x in aliases for v in hi)
        got = fetch_rows(con.sql(f"{rows.format(extra='')} SELECT {hists} FROM e"))[0]
        out[f"T={t:g}"] = {dr: {short: {v: _counts(got[f"{dr}_{short}_{v}"], bins) for v in hi}
                                for short in LOGIT_FIELDS} for dr in schema.DIRECTIONS}
    return out


def _counts(histogram: dict | None, bins: int) -> list[int]:
    """DuckDB's histogram() map (bin -> count, as a dict or (bin, count) pairs; None over no rows)
    as a list of `bins` counts."""
    counts = [0] * bins
    for b, n in dict(histogram or {}).items():
        counts[int(b)] = int(n)
    return counts


# --- helpers ----------------------------------------------------------------


def _shards_table(store: Store) -> pa.Table:
    """The manifest's shard entries as a table (one row per shard, sorted by name)."""
    entries = store.manifest.shards
    names = sorted(entries)
    types = {SOURCE: pa.string(), SIZE: pa.int64(), MTIME: pa.float64(), ROWS: pa.int64(),
             REJECTED: pa.int64(), POOLS: pa.int64(), SECONDS: pa.float64(), STATUS: pa.string()}
    cols = {schema.SHARD: pa.array(names, pa.string())}
    for fld in SHARD_FIELDS:
        try:
            cols[fld] = pa.array([entries[n].get(fld) for n in names], types[fld])
        except (pa.ArrowException, TypeError, ValueError):
            raise InputError(f"{store.path}: manifest shard entries hold a non-{types[fld]} {fld!r}") from None
    return pa.table(cols)


def _as_read_by_duckdb(arrow_schema: pa.Schema) -> pa.Schema:
    """The types DuckDB gives a signals Parquet file: float16 as float32, fixed-size lists as lists."""
    def plain(t: pa.DataType) -> pa.DataType:
        if pa.types.is_fixed_size_list(t):
            return pa.list_(plain(t.value_type))
        return pa.float32() if pa.types.is_float16(t) else t

    return pa.schema([pa.field(f.name, plain(f.type)) for f in arrow_schema])


def file_list(paths: list) -> str:
    """A DuckDB list literal of file paths (quotes doubled)."""
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def fetch_rows(rel) -> list[dict[str, Any]]:
    return rel.to_arrow_table().to_pylist()
