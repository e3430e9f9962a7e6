"""The output tree's names: which files under an output root are results, and where run records go.

Results are whole Parquet objects; every name starting with `_` or `.` (run records under
`_runs/`, temp files of shards being written) is not a result. The planner, the sink and the
report all read this one definition.
"""

from __future__ import annotations

RUNS_DIR = "_runs"  # run records; the leading underscore makes dataset readers skip them
RESULT_SUFFIX = ".parquet"


def is_result_path(relative: str) -> bool:
    """Whether a path relative to the output root names a result file: a `.parquet` file with no
    part (file or folder) starting with `_` or `.`; those are run records and half-written temp files."""
    return relative.endswith(RESULT_SUFFIX) and not any(part.startswith(("_", ".")) for part in relative.split("/"))


def list_result_files(uri: str) -> list[str]:
    """Committed result objects under `uri` (not run records, not temp files), sorted."""
    from vreason_batch.io import storage

    if not storage.exists(uri):
        return []
    root = uri.rstrip("/")
    return sorted(f for f in storage.list_files(uri, "*" + RESULT_SUFFIX) if is_result_path(f[len(root) + 1:]))
