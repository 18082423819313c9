"""Signal store schema (v1, and v2's view table): the only place a column is named or typed.

The teacher pass writes, and the student reads, one row per kept sample.
Batches everywhere are dicts keyed by these names. Feature widths (D, F) and
the candidate count K are pass parameters, so the Arrow schema is built from
them; the schema version travels in the Parquet key-value metadata and in the
manifest, and readers refuse a version they do not know.

Schema v2 adds one view table per shard (`view_schema`): a row per kept sample
and view 1..N-1. A file's metadata carries the version of its own schema:
signals and rejects files are v1 in every store, view files v2; the manifest
says 2 when the store has views.

Candidate lists hold K entries sorted by dual logit, highest first, the
positive always included. A pool smaller than K pads its lists with
`PAD_IDX` in `*_idx` and -inf in `*_dual` and `*_itm`.
"""
from __future__ import annotations

import pyarrow as pa

from mcad.storage.errors import InputError

SCHEMA_VERSION = 1        # the signals and rejects files; a store without views
VIEWS_SCHEMA_VERSION = 2  # a store with views, and its view files
KNOWN_VERSIONS = (1, 2)
METADATA_VERSION_KEY = b"mcad.schema_version"
PAD_IDX = -1

# --- signal columns -------------------------------------------------------
KEY = "key"              # WebDataset key of the sample
SHARD = "shard"          # input shard name (file stem)
ROW = "row"              # index among the shard's kept samples
POOL = "pool"            # pool index within the shard: row // P
IMG_EMB = "img_emb"      # v_i, L2-normalised, float16[D]
TXT_EMB = "txt_emb"      # t_i, L2-normalised, float16[D]
FUSED = "fused"          # f_ii, single teacher's fused [CLS], float16[F]
FUSED_PROJ = "fused_proj"  # g_i = normalise(f_ii W), float16[D]
ITM_POS = "itm_pos"      # m_ii = logit(match) - logit(no match), float32

DIRECTIONS = ("i2t", "t2i")
IDX, DUAL, ITM, DUAL_LSE = "idx", "dual", "itm", "dual_lse"


def col(direction: str, field: str) -> str:
    """Name of a per-direction column, e.g. col("i2t", IDX) == "i2t_idx"."""
    if direction not in DIRECTIONS or field not in (IDX, DUAL, ITM, DUAL_LSE):
        raise KeyError(f"no column {direction}_{field}")
    return f"{direction}_{field}"


# --- view columns (schema v2: views/<shard>.parquet) ----------------------
# KEY, SHARD, ROW as above; IMG_EMB is the dual teacher on the view; FUSED_PROJ,
# ITM_POS and the per-direction ITM lists (over the row's view-0 candidates) are
# the single teacher's on the view, null for views it did not score (v >= M).
VIEW = "view"            # 1..N-1 (view 0, the whole image, is the signals row)
BOX = "box"              # normalised (x0, y0, x1, y1) of the crop in the decoded image, float32[4]
BOX_WIDTH = 4
VIEW_SINGLE_COLUMNS = (FUSED_PROJ, ITM_POS) + tuple(col(dr, ITM) for dr in DIRECTIONS)

# --- batch keys that are not columns ---------------------------------------
DATA = "data"            # in joined batches: the decoded samples (image, captions) of each row
# In pools read with their views: "view_<column>" holds a view column per row and view,
# shaped (n, N-1, ...) for BOX and IMG_EMB, (n, M-1, ...) for VIEW_SINGLE_COLUMNS.
VIEW_PREFIX = "view_"


def view_key(column: str) -> str:
    """The batch key of a view column in a pool, e.g. view_key(BOX) == "view_box"."""
    return VIEW_PREFIX + column

# --- pool membership (issue #18): the teacher pass config's "pools" field --------
# consecutive: pool = row // P over the kept samples in shard order (rows follow the input).
# neighbours: the pass groups look-alike samples (pipeline/pools.py) and writes each shard's
# rows pool by pool, so rows no longer follow the input's order; pool = row // P still holds.
PASS_POOLS = "pools"
POOLS_CONSECUTIVE, POOLS_NEIGHBOURS = "consecutive", "neighbours"
POOL_MODES = (POOLS_CONSECUTIVE, POOLS_NEIGHBOURS)

# --- rejects columns -------------------------------------------------------
REJECT_KEY = "key"
REJECT_REASON = "reason"
REJECT_DETAIL = "detail"

REJECTS_SCHEMA = pa.schema(
    [(REJECT_KEY, pa.string()), (REJECT_REASON, pa.string()), (REJECT_DETAIL, pa.string())],
    metadata={METADATA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)


def signal_schema(*, d: int, f: int, k: int) -> pa.Schema:
    """Arrow schema of a signals file for dual width d, fused width f, k candidates."""
    if min(d, f, k) < 1:
        raise ValueError(f"dimensions must be positive, got d={d} f={f} k={k}")
    f16, f32, i32 = pa.float16(), pa.float32(), pa.int32()
    fields = [
        (KEY, pa.string()),
        (SHARD, pa.string()),
        (ROW, i32),
        (POOL, i32),
        (IMG_EMB, pa.list_(f16, d)),
        (TXT_EMB, pa.list_(f16, d)),
        (FUSED, pa.list_(f16, f)),
        (FUSED_PROJ, pa.list_(f16, d)),
        (ITM_POS, f32),
    ]
    for direction in DIRECTIONS:
        fields += [
            (col(direction, IDX), pa.list_(i32, k)),
            (col(direction, DUAL), pa.list_(f32, k)),
            (col(direction, ITM), pa.list_(f32, k)),
            (col(direction, DUAL_LSE), f32),
        ]
    return pa.schema(fields, metadata={METADATA_VERSION_KEY: str(SCHEMA_VERSION).encode()})


SIGNAL_COLUMNS = tuple(signal_schema(d=1, f=1, k=1).names)


def view_schema(*, d: int, k: int) -> pa.Schema:
    """Arrow schema of a view file (schema v2) for dual width d and k candidates."""
    if min(d, k) < 1:
        raise ValueError(f"dimensions must be positive, got d={d} k={k}")
    f16, f32, i32 = pa.float16(), pa.float32(), pa.int32()
    fields = [
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(SHARD, pa.string(), nullable=False),
        pa.field(ROW, i32, nullable=False),
        pa.field(VIEW, i32, nullable=False),
        pa.field(BOX, pa.list_(f32, BOX_WIDTH), nullable=False),
        pa.field(IMG_EMB, pa.list_(f16, d), nullable=False),
        pa.field(FUSED_PROJ, pa.list_(f16, d)),
        pa.field(ITM_POS, f32),
        pa.field(col("i2t", ITM), pa.list_(f32, k)),
        pa.field(col("t2i", ITM), pa.list_(f32, k)),
    ]
    return pa.schema(fields, metadata={METADATA_VERSION_KEY: str(VIEWS_SCHEMA_VERSION).encode()})


VIEW_COLUMNS = tuple(view_schema(d=1, k=1).names)


def validate_views(table: pa.Table, *, where: str = "view table") -> dict[str, int]:
    """Check a view table's columns and types against schema v2; return its dims {"d", "k"} or raise InputError."""
    check_version(version_of(table.schema), where, known=(VIEWS_SCHEMA_VERSION,), what="view")
    return _check_columns(table, where, columns=VIEW_COLUMNS, what="view", dims=view_dims_of, build=view_schema)


def view_dims_of(schema: pa.Schema) -> dict[str, int]:
    """Recover d, k from a view schema."""
    return {"d": schema.field(IMG_EMB).type.list_size, "k": schema.field(col("i2t", ITM)).type.list_size}


def dims_of(schema: pa.Schema) -> dict[str, int]:
    """Recover d, f, k from a signals schema."""
    return {
        "d": schema.field(IMG_EMB).type.list_size,
        "f": schema.field(FUSED).type.list_size,
        "k": schema.field(col("i2t", IDX)).type.list_size,
    }


def version_of(schema: pa.Schema) -> int | None:
    meta = schema.metadata or {}
    raw = meta.get(METADATA_VERSION_KEY)
    return int(raw) if raw is not None else None


def check_version(version: int | None, where: str, *, known: tuple[int, ...] = KNOWN_VERSIONS,
                  what: str = "signal") -> None:
    """Refuse a schema version outside `known` (a store's: KNOWN_VERSIONS; a file's: its own type's)."""
    if version not in known:
        raise InputError(
            f"{where}: {what} schema version {version} is not supported by this mcad "
            f"(it reads versions {', '.join(map(str, known))})"
        )


def validate(table: pa.Table, *, where: str = "table") -> dict[str, int]:
    """Check a signals table against schema v1 (the signals files of every store); return its dims
    or raise InputError."""
    check_version(version_of(table.schema), where, known=(SCHEMA_VERSION,))
    return _check_columns(table, where, columns=SIGNAL_COLUMNS, what="signal", dims=dims_of, build=signal_schema)


def _check_columns(table: pa.Table, where: str, *, columns, what: str, dims, build) -> dict[str, int]:
    """The columns present, their widths read by `dims(schema)`, every type as `build(**dims)` has it."""
    missing = [c for c in columns if c not in table.schema.names]
    if missing:
        raise InputError(f"{where}: missing {what} columns {missing}")
    try:
        found = dims(table.schema)
    except (AttributeError, KeyError) as exc:
        raise InputError(f"{where}: feature columns are not fixed-size lists ({exc})") from None
    for field in build(**found):
        got = table.schema.field(field.name).type
        if got != field.type:
            raise InputError(f"{where}: column {field.name} has type {got}, expected {field.type}")
    return found
