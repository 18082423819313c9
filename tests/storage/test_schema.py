"""Schema v1: column set and types, version metadata, validation of tables."""
from __future__ import annotations

import pyarrow as pa
import pytest

from mcad.storage import schema
from mcad.storage.errors import InputError


def test_signal_schema_types_and_version():
    sch = schema.signal_schema(d=8, f=12, k=3)
    assert tuple(sch.names) == schema.SIGNAL_COLUMNS
    assert len(set(sch.names)) == len(sch.names)
    assert sch.field(schema.IMG_EMB).type == pa.list_(pa.float16(), 8)
    assert sch.field(schema.FUSED).type == pa.list_(pa.float16(), 12)
    assert sch.field(schema.col("t2i", schema.IDX)).type == pa.list_(pa.int32(), 3)
    assert sch.field(schema.col("i2t", schema.DUAL_LSE)).type == pa.float32()
    assert schema.version_of(sch) == schema.SCHEMA_VERSION
    assert schema.dims_of(sch) == {"d": 8, "f": 12, "k": 3}


def test_col_names_and_bad_names():
    assert schema.col("i2t", schema.IDX) == "i2t_idx"
    with pytest.raises(KeyError):
        schema.col("x2y", schema.IDX)
    with pytest.raises(KeyError):
        schema.col("i2t", "nope")


def test_signal_schema_rejects_bad_dims():
    with pytest.raises(ValueError):
        schema.signal_schema(d=0, f=1, k=1)


def test_check_version_refuses_unknown():
    schema.check_version(1, "x")
    with pytest.raises(InputError, match="version 99"):
        schema.check_version(99, "x")
    with pytest.raises(InputError, match="version None"):
        schema.check_version(None, "x")


def test_validate_accepts_and_refuses():
    sch = schema.signal_schema(d=4, f=5, k=2)
    assert schema.validate(sch.empty_table()) == {"d": 4, "f": 5, "k": 2}
    with pytest.raises(InputError, match="version"):
        schema.validate(sch.remove_metadata().empty_table())
    with pytest.raises(InputError, match="missing signal columns"):
        schema.validate(sch.remove(sch.get_field_index(schema.ITM_POS)).empty_table())
    wrong = sch.set(sch.get_field_index(schema.ITM_POS), pa.field(schema.ITM_POS, pa.float64()))
    with pytest.raises(InputError, match=schema.ITM_POS):
        schema.validate(wrong.empty_table())
    varlen = sch.set(sch.get_field_index(schema.IMG_EMB), pa.field(schema.IMG_EMB, pa.list_(pa.float16())))
    with pytest.raises(InputError, match="fixed-size"):
        schema.validate(varlen.empty_table())


def test_rejects_schema():
    assert schema.REJECTS_SCHEMA.names == [schema.REJECT_KEY, schema.REJECT_REASON, schema.REJECT_DETAIL]
    assert schema.version_of(schema.REJECTS_SCHEMA) == schema.SCHEMA_VERSION


def test_the_format_is_pinned():
    # Stores on disk are read by later versions: the column names and types, the version
    # key, the padding index and the rejects columns are the format, spelled out here.
    f16, f32, i32 = pa.float16(), pa.float32(), pa.int32()
    version = {b"mcad.schema_version": b"1"}

    def per_direction(dr):
        return [(f"{dr}_idx", pa.list_(i32, 4)), (f"{dr}_dual", pa.list_(f32, 4)),
                (f"{dr}_itm", pa.list_(f32, 4)), (f"{dr}_dual_lse", f32)]

    expected = pa.schema(
        [("key", pa.string()), ("shard", pa.string()), ("row", i32), ("pool", i32),
         ("img_emb", pa.list_(f16, 2)), ("txt_emb", pa.list_(f16, 2)), ("fused", pa.list_(f16, 3)),
         ("fused_proj", pa.list_(f16, 2)), ("itm_pos", f32)] + per_direction("i2t") + per_direction("t2i"),
        metadata=version)
    assert schema.signal_schema(d=2, f=3, k=4).equals(expected, check_metadata=True)
    assert schema.SIGNAL_COLUMNS == tuple(expected.names)
    rejects = pa.schema([("key", pa.string()), ("reason", pa.string()), ("detail", pa.string())], metadata=version)
    assert schema.REJECTS_SCHEMA.equals(rejects, check_metadata=True)
    assert schema.PAD_IDX == -1
    assert schema.DATA == "data"  # the decoded samples' key in joined batches


def test_validate_names_a_table_by_default():
    with pytest.raises(InputError, match="^table: "):
        schema.validate(schema.signal_schema(d=1, f=1, k=1).remove_metadata().empty_table())
