"""`mcad signals stats|validate|sql` through click's CliRunner, on stores from the make_store fixture."""
from __future__ import annotations

import csv
import io
import json

import pyarrow.parquet as pq
import pytest

from helpers import assert_one_line_error, image_bytes, invoke, record_digests, write_tar
from mcad.storage.query import LOGIT_FIELDS, store_stats
from mcad.storage import schema
from mcad.storage.manifest import Manifest, signals_path
from mcad.storage.reader import open_store



def mcad(*args: str):
    return invoke("signals", *args)


@pytest.mark.parametrize("command", ["stats", "validate", "sql"])
def test_help_has_examples(command):
    result = mcad(command, "--help")
    assert result.exit_code == 0 and "Examples:" in result.output
    assert f"mcad signals {command} out/store" in result.output


def test_stats_prints_tables_and_writes_the_figures(tmp_path, make_store):
    store = make_store(tmp_path / "store", rows_per_shard=(10, 7), rejects_per_shard=2)
    result = mcad("stats", store, "--json", tmp_path / "stats.json")
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "stats.json").read_text())
    # the figures are store_stats' (checked against numpy in tests/storage/test_query.py);
    # DuckDB's parallel sums may differ in the last bit from run to run
    want = json.loads(json.dumps(store_stats(store)))
    assert {k: v for k, v in figures.items() if k != "candidates"} == {
        k: v for k, v in want.items() if k != "candidates"}
    for dr in schema.DIRECTIONS:
        got, exp = figures["candidates"][dr], want["candidates"][dr]
        assert got["topk_mass"] == pytest.approx(exp["topk_mass"], rel=1e-12)
        for short in LOGIT_FIELDS:
            assert got[short] == pytest.approx(exp[short], rel=1e-12)
    out = result.output
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["00000"][1:] == ["10", "2", "3"] and lines["00001"][1:] == ["7", "2", "2"]
    assert lines["total"][1:] == ["17", "4", "5"]
    assert "decode_error" in out and "/fake/teachers/single" in out
    i2t_dual = next(line for line in out.splitlines() if line.split()[:2] == ["i2t", "dual"]).split()
    cand = figures["candidates"]["i2t"]
    assert [float(x) for x in i2t_dual[2:]] == pytest.approx(
        [cand["dual"]["top1"], cand["dual"]["entropy"], cand["topk_mass"]], abs=6e-5)


def test_stats_of_something_that_is_not_a_store(tmp_path):
    assert_one_line_error(mcad("stats", tmp_path), "not a signal store")


# --- validate ----------------------------------------------------------------


def test_validate_ok(tmp_path, make_store):
    result = mcad("validate", make_store(tmp_path / "store"))
    assert result.exit_code == 0, result.output
    assert result.stdout == ("ok: 2 shards, 17 rows, 5 pools, 2 rejected (manifest, schema, counts, rows, "
                             "digests, page checksums)\n")


def test_validate_catches_a_changed_row_count(tmp_path, make_store):
    store = make_store(tmp_path / "store")
    m = Manifest.load(store)
    m.shards["00001"]["rows"] = 8
    m.save(store)
    assert_one_line_error(mcad("validate", store), "shard 00001", "files hold 7 rows, the manifest says 8")


def test_validate_catches_a_missing_shard(tmp_path, make_store):
    store = make_store(tmp_path / "store")
    signals_path(store, "00000").unlink()
    assert_one_line_error(mcad("validate", store), "shard 00000", "missing")


def test_validate_catches_rows_out_of_order(tmp_path, make_store):
    store = make_store(tmp_path / "store")
    f = signals_path(store, "00000")
    table = pq.read_table(f)
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), f)
    assert_one_line_error(mcad("validate", store), "shard 00000", "the file changed after the pass")
    record_digests(store, "00000")  # as if the pass itself had written the rows out of order
    assert_one_line_error(mcad("validate", store), "shard 00000", "rows are not 0..n-1 in file order")


def _write_data(folder, store_path, *, drop: str | None = None) -> None:
    """One real tar per store shard, same keys in tar order: kept samples as a png + caption,
    rejected ones with an undecodable image; `drop` leaves one key out."""
    store = open_store(store_path)
    folder.mkdir()
    png = image_bytes("PNG", size=(4, 4))
    for shard in store.shards:
        kept = pq.read_table(signals_path(store.path, shard), columns=[schema.KEY])[schema.KEY].to_pylist()
        rejected = store.rejected_keys(shard)
        members = []
        for key in sorted(kept + sorted(rejected)):  # the fixture's keys sort in tar order
            if key == drop:
                continue
            image = b"not an image" if key in rejected else png
            members += [(f"{key}.png", image), (f"{key}.txt", b"a small red square")]
        write_tar(folder / f"{shard}.tar", members)


def test_validate_with_data_whose_keys_match(tmp_path, make_store):
    store = make_store(tmp_path / "store")
    _write_data(tmp_path / "data", store)
    result = mcad("validate", store, "--data", tmp_path / "data")
    assert result.exit_code == 0, result.output
    assert "data keys" in result.output


def test_validate_with_data_missing_a_kept_key(tmp_path, make_store):
    store = make_store(tmp_path / "store")
    _write_data(tmp_path / "data", store, drop="00001-000002")
    assert_one_line_error(mcad("validate", store, "--data", tmp_path / "data"), "shard 00001", "00001-000002")


def test_validate_with_data_lacking_a_shard(tmp_path, make_store):
    store = make_store(tmp_path / "store")
    _write_data(tmp_path / "data", store)
    (tmp_path / "data" / "00001.tar").unlink()
    assert_one_line_error(mcad("validate", store, "--data", tmp_path / "data"),
                    "store shard 00001 is not in the data")


# --- sql ---------------------------------------------------------------------


def test_sql_prints_a_table(tmp_path, make_store):
    store = make_store(tmp_path / "store")
    result = mcad("sql", store, f"SELECT {schema.SHARD}, count(*) AS n FROM signals GROUP BY ALL ORDER BY 1")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "00000" in line or "00001" in line]
    assert len(rows) == 2 and rows[0].split()[1:4] == ["00000", "│", "10"]


def test_sql_csv_and_json_lines(tmp_path, make_store):
    store = make_store(tmp_path / "store")
    query = f"SELECT {schema.KEY}, {schema.POOL}, {schema.col('i2t', schema.DUAL)} FROM signals ORDER BY {schema.SHARD} DESC, {schema.ROW}"
    result = mcad("sql", store, query, "--csv", "--limit", "2")
    assert result.exit_code == 0, result.output
    got = list(csv.reader(io.StringIO(result.output)))
    assert got[0] == [schema.KEY, schema.POOL, schema.col("i2t", schema.DUAL)] and len(got) == 3
    assert got[1][0].startswith("00001-") and got[1][1] == "0"
    result = mcad("sql", store, query, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 17 and rows[-1][schema.POOL] == 2
    assert rows[-1][schema.col("i2t", schema.DUAL)][-1] == float("-inf")  # the last pool of 00000 is padded


def test_sql_over_rejects_and_shards(tmp_path, make_store):
    store = make_store(tmp_path / "store")
    query = ("SELECT s.shard, s.rejected, count(r.key) AS n FROM shards s "
             "LEFT JOIN rejects r USING (shard) GROUP BY ALL ORDER BY 1")
    result = mcad("sql", store, query, "--json")
    assert [json.loads(x) for x in result.output.splitlines()] == [
        {"shard": "00000", "rejected": 1, "n": 1}, {"shard": "00001", "rejected": 1, "n": 1}]


@pytest.mark.parametrize("query, needle", [
    ("SELECT nope FROM signals", "nope"),
    ("SELECT 1 +", "syntax error"),
    ("SELECT CAST(key AS INTEGER) FROM signals", "Conversion Error"),  # fails only when it runs
])
def test_sql_bad_query_fails_on_one_line(tmp_path, make_store, query, needle):
    store = make_store(tmp_path / "store")
    assert_one_line_error(mcad("sql", store, query), "SQL error", needle)


def test_sql_csv_and_json_exclude_each_other(tmp_path, make_store):
    assert_one_line_error(mcad("sql", make_store(tmp_path / "store"), "SELECT 1", "--csv", "--json"), "exclude")
