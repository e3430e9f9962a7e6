"""Reading the Parquet output: every result file under a local directory or s3:// prefix (or one file).

`load_results` reads them as one table, `_open_dataset` as a pyarrow dataset, also while a run is
still writing shards; run records and shards being written (names starting with `_` or `.`) are
never read.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from vreason_batch.io import storage
from vreason_batch.io.outputs import is_result_path
from vreason_batch.io.schema import OUTPUT_SCHEMA


class NoResults(FileNotFoundError):
    """No Parquet result file under the given location."""


def _result_files(uri: str) -> tuple[Any, list[str]]:
    """(pyarrow filesystem, sorted Parquet paths) under `uri`, skipping `_*` and `.*` files and dirs.

    Run records (`_run.json`, completion markers) and temporary files of shards being written
    live under such names; a temp file is a half-written Parquet file and must never be read.
    """
    import pyarrow.fs as pafs

    fs, base = storage.pyarrow_fs(uri)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        return fs, [base] if base.endswith(".parquet") else []
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    paths = []
    for entry in fs.get_file_info(selector):
        if entry.type == pafs.FileType.File and is_result_path(entry.path[len(base) :].lstrip("/")):
            paths.append(entry.path)
    return fs, sorted(paths)


def _open_dataset(uri: str):
    import pyarrow.dataset as pads

    fs, paths = _result_files(uri)
    if not paths:
        raise NoResults(
            f"no Parquet result files under {uri} (is the output URI right? has the run written a shard"
            " yet? files and folders whose names start with '_' or '.' are skipped)"
        )
    # The explicit schema makes every shard read alike: a column missing from one file is null.
    return pads.dataset(paths, schema=OUTPUT_SCHEMA, format="parquet", filesystem=fs)


def load_results(uri: str, columns: list[str] | tuple[str, ...] | None = None) -> pa.Table:
    """Every result row under a local directory or s3:// prefix (or one .parquet file) as one table.

    Works on a run that is still writing: the shards written so far are read. Raises `NoResults`
    when there is no result file at all. `columns` limits the columns read (default: all).
    """
    return _open_dataset(uri).to_table(columns=list(columns) if columns is not None else None)
