"""A store's Parquet files opened and decoded with every page's checksum verified.

A page that fails its checksum, or does not decode, becomes one InputError
naming the file and the column (docs/design.md, section 4, integrity).
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from mcad.storage import fs
from mcad.storage.errors import InputError, error_line


def parquet_file(location, *, verify: bool = True) -> pq.ParquetFile:
    """A Parquet file at a local path or a URI (the store's filesystem, reused).

    Every page's checksum is verified as it is read (a page written without
    one, as in stores from before 2026-12-01, is read as it is); verify=False
    only for measuring what that costs (`mcad bench store`).
    """
    if not fs.is_uri(location):
        return pq.ParquetFile(location, page_checksum_verification=verify)
    filesystem, path = fs.resolve(location)
    return pq.ParquetFile(path, filesystem=filesystem, page_checksum_verification=verify)


# What pyarrow raises on a page whose checksum fails or that does not decode.
_UNREADABLE = (pa.ArrowException, OSError)


def read_checked(pf: pq.ParquetFile, groups: list[int], columns: list[str], where: str) -> pa.Table:
    """pf.read_row_groups(groups, columns); a page that fails raises InputError naming its column."""
    try:
        return pf.read_row_groups(groups, columns=columns)
    except _UNREADABLE as exc:
        column = next((c for c in columns if not _decodes(pf, groups, c)), None)
        raise unreadable_column(where, column, exc) from None


def decode_file(location, where: str) -> int:
    """Decode every column of every row group, page checksums verified; return the rows.

    InputError names the first column (in file order) that fails, row group by row group.
    """
    try:
        pf = parquet_file(location)
    except _UNREADABLE as exc:
        raise InputError(f"{where}: unreadable Parquet file ({error_line(exc, first=True)})") from None
    with pf:
        for i in range(pf.metadata.num_row_groups):
            for column in pf.schema_arrow.names:
                try:
                    pf.read_row_group(i, columns=[column])
                except _UNREADABLE as exc:
                    raise unreadable_column(where, column, exc) from None
        return pf.metadata.num_rows


def unreadable_column(where: str, column: str | None, exc: BaseException) -> InputError:
    at = f": column {column}" if column else ""
    return InputError(f"{where}{at}: unreadable ({error_line(exc, first=True)}); the file is damaged: "
                      f"restore it or rerun the teacher pass")


def _decodes(pf: pq.ParquetFile, groups: list[int], column: str) -> bool:
    try:
        pf.read_row_groups(groups, columns=[column])
        return True
    except _UNREADABLE:
        return False
