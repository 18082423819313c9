"""The signal store's manifest: `OUT/manifest.json`.

It says what a store was made from and how far the teacher pass got: the
schema and mcad versions, the teachers' identities (paths and sha256
digests), the pass parameters (pool size P, candidates K, widths D and F,
dtypes, image sizes...) and, per input shard, its source identity (path,
size, mtime), row counts and status. A shard is complete when its signals
file exists AND its manifest entry says "done"; the manifest is rewritten
atomically after each shard, so a crash never leaves a half-written one.

    m = Manifest(teachers={...}, params={"pool_size": 64, "k": 8, "d": 512, "f": 768})
    m.record_shard("00000", {**source_identity(tar), "rows": 990, "rejected": 10,
                             "pools": 16, "seconds": 3.2, "status": STATUS_DONE})
    m.save(out)                    # later: Manifest.load(out)
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mcad.storage import fs
from mcad.storage import schema
from mcad.storage.errors import InputError, error_line
from mcad.storage.schema import SCHEMA_VERSION, VIEWS_SCHEMA_VERSION, check_version

MANIFEST_NAME = "manifest.json"
SIGNALS_DIR = "signals"
REJECTS_DIR = "rejects"
VIEWS_DIR = "views"  # schema v2: views/<shard>.parquet, one row per kept sample and view 1..N-1
FUSION_PROJ_NAME = "fusion_proj.safetensors"
PASS_CONFIG_NAME = "teacher_pass_config.json"  # the resolved teacher-pass job (jobs/teacher_pass.py)
LOCK_NAME = "pass.lock"  # held by the one teacher pass writing the store (storage/lock.py)

# Pass parameters every reader needs; the rest of `params` is free-form.
PARAM_POOL_SIZE, PARAM_K, PARAM_D, PARAM_F = "pool_size", "k", "d", "f"
REQUIRED_PARAMS = (PARAM_POOL_SIZE, PARAM_K, PARAM_D, PARAM_F)
# The dual teacher's logit scale s (the student rebuilds s·v'·t' from it) and W's digest.
PARAM_LOGIT_SCALE, PARAM_FUSION_PROJ_SHA256 = "logit_scale", "fusion_proj_sha256"

# Per-shard entry fields.
SOURCE, SIZE, MTIME = "source", "size", "mtime"
ROWS, REJECTED, POOLS, SECONDS, STATUS = "rows", "rejected", "pools", "seconds", "status"
SHARD_FIELDS = (SOURCE, SIZE, MTIME, ROWS, REJECTED, POOLS, SECONDS, STATUS)
STATUS_DONE = "done"
# A shard the pass has planned but not finished: every input shard is recorded so at the pass's start.
STATUS_PENDING = "pending"
# The input tar's sha256, taken while the pass's worker read it (absent before 2026-12-01).
SOURCE_SHA256 = "source_sha256"
# The store's own files, per shard entry: sha256 and byte size of its signals and rejects file
# (written by storage.writer.write_shard; a store written before 2026-12-01 has none of them).
SIGNALS_SHA256, SIGNALS_BYTES = "signals_sha256", "signals_bytes"
REJECTS_SHA256, REJECTS_BYTES = "rejects_sha256", "rejects_bytes"
FILE_DIGEST_FIELDS = {SIGNALS_DIR: (SIGNALS_SHA256, SIGNALS_BYTES), REJECTS_DIR: (REJECTS_SHA256, REJECTS_BYTES)}
DIGEST_FIELDS = (SIGNALS_SHA256, SIGNALS_BYTES, REJECTS_SHA256, REJECTS_BYTES)
# A store with views (schema v2): its view file's sha256 and size, per done shard.
VIEWS_SHA256, VIEWS_BYTES = "views_sha256", "views_bytes"
VIEW_DIGEST_FIELDS = {VIEWS_DIR: (VIEWS_SHA256, VIEWS_BYTES)}

# The view recipe (manifest field `views`, schema v2 only): what makes a view's pixels.
VIEW_N, VIEW_M, VIEW_SEED = "n", "m", "seed"                # views per sample, views the single teacher scored
VIEW_CROP_SCALE, VIEW_CROP_RATIO = "crop_scale", "crop_ratio"  # [lo, hi] each
VIEW_RULE = "rule_version"                                  # of the box -> pixels rule (pipeline/views.py)
VIEW_PILLOW, VIEW_TORCHVISION = "pillow", "torchvision"     # their versions (None: not used)
VIEW_FIELDS = (VIEW_N, VIEW_M, VIEW_CROP_SCALE, VIEW_CROP_RATIO, VIEW_SEED, VIEW_RULE, VIEW_PILLOW,
               VIEW_TORCHVISION)

# manifest.json's digest of itself: sha256 of its other fields as canonical JSON (absent before 2026-12-01).
MANIFEST_SHA256 = "manifest_sha256"

_DIGEST_CHUNK = 1 << 20


def mcad_version() -> str:
    try:
        return importlib.metadata.version("mcad")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def store_file(store: str | os.PathLike, *parts: str) -> Path | str:
    """A file of a store: a Path when the store is local, a URI string when it is at a URI."""
    return fs.join(store, *parts) if fs.is_uri(store) else Path(store).joinpath(*parts)


def manifest_path(store: str | os.PathLike) -> Path | str:
    return store_file(store, MANIFEST_NAME)


def signals_path(store: str | os.PathLike, shard: str) -> Path | str:
    return store_file(store, SIGNALS_DIR, f"{shard}.parquet")


def rejects_path(store: str | os.PathLike, shard: str) -> Path | str:
    return store_file(store, REJECTS_DIR, f"{shard}.parquet")


def views_path(store: str | os.PathLike, shard: str) -> Path | str:
    return store_file(store, VIEWS_DIR, f"{shard}.parquet")


@dataclass
class Manifest:
    """The contents of manifest.json. Mutable on purpose: the pass records shards as they finish."""

    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    mcad_version: str = field(default_factory=mcad_version)
    # The view recipe (VIEW_FIELDS) of a store with views (schema v2); None: one view, schema v1,
    # and the field is left out of manifest.json.
    views: dict[str, Any] | None = None
    # Whether the file it was loaded from carried its own digest (and so it was checked).
    sealed: ClassVar[bool] = False

    @classmethod
    def load(cls, store: str | os.PathLike) -> "Manifest":
        path = manifest_path(store)
        if not fs.is_file(path):
            raise InputError(f"{store}: not a signal store (no {MANIFEST_NAME})")
        try:
            raw = json.loads(fs.read_bytes(path).decode())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path}: expected a JSON object")
        check_version(raw.get("schema_version"), str(path))
        known = {"teachers", "params", "shards", "schema_version", "mcad_version", "views", MANIFEST_SHA256}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InputError(f"{path}: unknown manifest fields {unknown}")
        sealed = MANIFEST_SHA256 in raw
        pinned = raw.pop(MANIFEST_SHA256, None)
        if sealed and pinned != manifest_digest(raw):
            raise InputError(f"{path}: contents do not match its {MANIFEST_SHA256} (a damaged or hand-edited "
                             f"manifest); restore it from a copy or rerun the teacher pass")
        try:
            manifest = cls(**raw)
        except TypeError as exc:  # a required field missing
            raise InputError(f"{path}: not a manifest ({exc})") from None
        manifest.sealed = sealed
        check_views_recipe(manifest, str(path))
        return manifest

    def save(self, store: str | os.PathLike) -> None:
        """Atomically rewrite manifest.json (temp file + rename; one upload at a URI), with its own digest."""
        fields = self.to_dict()
        fs.write_json(manifest_path(store), {**fields, MANIFEST_SHA256: manifest_digest(fields)})

    def to_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        if fields["views"] is None:  # a store without views keeps its v1 manifest, byte for byte
            del fields["views"]
        return fields

    def set_views(self, recipe: dict[str, Any] | None) -> None:
        """Record a view recipe (schema v2); None or one view per sample leaves a v1 store."""
        if recipe and recipe.get(VIEW_N, 1) > 1:
            self.views, self.schema_version = dict(recipe), VIEWS_SCHEMA_VERSION
        else:
            self.views, self.schema_version = None, SCHEMA_VERSION

    @property
    def num_views(self) -> int:
        """Views per sample, view 0 included (1 in a store without views)."""
        return int(self.views[VIEW_N]) if self.views else 1

    @property
    def single_views(self) -> int:
        """Views the single teacher scored, view 0 included (the first M)."""
        return int(self.views[VIEW_M]) if self.views else 1

    def record_shard(self, name: str, entry: dict[str, Any]) -> None:
        """Add or replace a shard's entry; it must carry every field of SHARD_FIELDS."""
        missing = [k for k in SHARD_FIELDS if k not in entry]
        if missing:
            raise ValueError(f"shard {name}: manifest entry lacks {missing}")
        self.shards[name] = dict(entry)

    def done_shards(self) -> list[str]:
        """Names of the finished shards, in sorted (store) order."""
        return sorted(n for n, e in self.shards.items() if e.get(STATUS) == STATUS_DONE)


def check_views_recipe(manifest: Manifest, where: str) -> None:
    """A v2 manifest holds a whole view recipe with 1 <= M <= N and N > 1; a v1 manifest none."""
    recipe = manifest.views
    if manifest.schema_version == SCHEMA_VERSION:
        if recipe is not None:
            raise InputError(f"{where}: a schema v{SCHEMA_VERSION} manifest with a view recipe")
        return
    if not isinstance(recipe, dict):
        raise InputError(f"{where}: a schema v{VIEWS_SCHEMA_VERSION} manifest needs its view recipe (views)")
    missing = [k for k in VIEW_FIELDS if k not in recipe]
    unknown = sorted(set(recipe) - set(VIEW_FIELDS))
    if missing or unknown:
        raise InputError(f"{where}: view recipe lacks {missing}, has unknown fields {unknown}")
    n, m = recipe[VIEW_N], recipe[VIEW_M]
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= m <= n and n > 1):
        raise InputError(f"{where}: view recipe needs integers 1 <= m <= n and n > 1, got n={n!r} m={m!r}")


def load(store: str | os.PathLike) -> Manifest:
    return Manifest.load(store)


def manifest_digest(fields: dict[str, Any]) -> str:
    """sha256 of a manifest's fields as canonical JSON (sorted keys, no spaces): what MANIFEST_SHA256 holds."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_record(path: str | os.PathLike, folder: str) -> dict[str, Any]:
    """A store file's digest fields for its shard entry: {<folder>_sha256, <folder>_bytes}."""
    sha, size = {**FILE_DIGEST_FIELDS, **VIEW_DIGEST_FIELDS}[folder]
    return {sha: file_digest(path), size: fs.size_and_mtime(path)[0]}


def source_identity(path: str | os.PathLike) -> dict[str, Any]:
    """{"source", "size", "mtime"} of an input file: cheap to take, changes when the file does."""
    try:
        size, mtime = fs.size_and_mtime(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such input file") from None
    source = str(path) if fs.is_uri(path) else str(Path(path).resolve())
    return {SOURCE: source, SIZE: size, MTIME: mtime}


def same_source(pinned: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether an input file is unchanged: the same size and mtime (to the millisecond: a local
    stat and an object store's listing give the same file's mtime at different precisions)."""
    return pinned[SIZE] == now[SIZE] and abs(float(pinned[MTIME]) - float(now[MTIME])) < 1e-3


def file_digest(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, streamed; of a folder, over its files' relative names and digests."""
    if fs.is_uri(path):
        return hashlib.sha256(fs.read_bytes(path)).hexdigest()
    path = Path(path)
    if path.is_dir():
        outer = hashlib.sha256()
        for sub in sorted(p for p in path.rglob("*") if p.is_file()):
            outer.update(f"{sub.relative_to(path).as_posix()}\0{file_digest(sub)}\n".encode())
        return outer.hexdigest()
    if not path.is_file():
        raise InputError(f"{path}: no such file to digest")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_DIGEST_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_projection(store: str | os.PathLike, manifest: Manifest) -> bool:
    """Check the store's fusion_proj.safetensors against the manifest's fusion_proj_sha256.

    False when the manifest records none (a store from before it did); InputError
    when the file is missing or its digest differs.
    """
    pinned = manifest.params.get(PARAM_FUSION_PROJ_SHA256)
    if pinned is None:
        return False
    path = store_file(store, FUSION_PROJ_NAME)
    if not fs.is_file(path):
        raise InputError(f"{store}: {FUSION_PROJ_NAME} is missing (the manifest records its digest)")
    if file_digest(path) != pinned:
        raise InputError(f"{store}: {FUSION_PROJ_NAME} does not match the manifest's "
                         f"{PARAM_FUSION_PROJ_SHA256}: the file is damaged or was replaced; "
                         f"restore it or rerun the teacher pass")
    return True


def pass_pool_mode(store) -> str:
    """How the store's teacher pass formed pools: its PASS_CONFIG_NAME's schema.PASS_POOLS field
    (issue #18); consecutive for a store without that file or field. With neighbours, each shard's
    rows are written pool by pool, not in the input's order."""
    path = store_file(store, PASS_CONFIG_NAME)
    if not fs.exists(path):
        return schema.POOLS_CONSECUTIVE
    try:
        saved = json.loads(fs.read_bytes(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"{store}: unreadable {PASS_CONFIG_NAME} ({error_line(exc)})") from None
    mode = saved.get(schema.PASS_POOLS, schema.POOLS_CONSECUTIVE) if isinstance(saved, dict) else None
    if mode not in schema.POOL_MODES:
        raise InputError(f"{store}: {PASS_CONFIG_NAME} names pool mode {mode!r}, not one of {schema.POOL_MODES}")
    return mode
