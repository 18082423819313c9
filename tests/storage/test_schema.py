"""Schema v1: column set and types, version metadata, validation of tables."""
from __future__ import annotations

import pyarrow as pa
import pytest

from storage import schema as S
from storage.errors import InputError


def test_signal_schema_types_and_version():
    sch = S.signal_schema(d=8, f=12, k=3)
    assert tuple(sch.names) == S.SIGNAL_COLUMNS
    assert len(set(sch.names)) == len(sch.names)
    assert sch.field(S.IMG_EMB).type == pa.list_(pa.float16(), 8)
    assert sch.field(S.FUSED).type == pa.list_(pa.float16(), 12)
    assert sch.field(S.col("t2i", S.IDX)).type == pa.list_(pa.int32(), 3)
    assert sch.field(S.col("i2t", S.DUAL_LSE)).type == pa.float32()
    assert S.version_of(sch) == S.SCHEMA_VERSION
    assert S.dims_of(sch) == {"d": 8, "f": 12, "k": 3}


def test_col_names_and_bad_names():
    assert S.col("i2t", S.IDX) == "i2t_idx"
    with pytest.raises(KeyError):
        S.col("x2y", S.IDX)
    with pytest.raises(KeyError):
        S.col("i2t", "nope")


def test_signal_schema_rejects_bad_dims():
    with pytest.raises(ValueError):
        S.signal_schema(d=0, f=1, k=1)


def test_check_version_refuses_unknown():
    S.check_version(1, "x")
    with pytest.raises(InputError, match="version 99"):
        S.check_version(99, "x")
    with pytest.raises(InputError, match="version None"):
        S.check_version(None, "x")


def test_validate_accepts_and_refuses():
    sch = S.signal_schema(d=4, f=5, k=2)
    assert S.validate(sch.empty_table()) == {"d": 4, "f": 5, "k": 2}
    with pytest.raises(InputError, match="version"):
        S.validate(sch.remove_metadata().empty_table())
    with pytest.raises(InputError, match="missing signal columns"):
        S.validate(sch.remove(sch.get_field_index(S.ITM_POS)).empty_table())
    wrong = sch.set(sch.get_field_index(S.ITM_POS), pa.field(S.ITM_POS, pa.float64()))
    with pytest.raises(InputError, match=S.ITM_POS):
        S.validate(wrong.empty_table())
    varlen = sch.set(sch.get_field_index(S.IMG_EMB), pa.field(S.IMG_EMB, pa.list_(pa.float16())))
    with pytest.raises(InputError, match="fixed-size"):
        S.validate(varlen.empty_table())


def test_rejects_schema():
    assert S.REJECTS_SCHEMA.names == [S.REJECT_KEY, S.REJECT_REASON, S.REJECT_DETAIL]
    assert S.version_of(S.REJECTS_SCHEMA) == S.SCHEMA_VERSION
