"""Hive-style partition directories (`dataset=mmvu/mode=vreason/`): escaping values, splitting tables.

Athena, Spark, DuckDB (`hive_partitioning`) and pyarrow (`partitioning="hive"`) read a path
segment `key=value` as a column and prune the directories a query does not need. Values are
URL-quoted outside `[A-Za-z0-9._-]` (readers URL-decode them), and a null is
`__HIVE_DEFAULT_PARTITION__`, as Hive writes it and as DuckDB and pyarrow read it back to NULL
(an empty string is an empty value, `dataset=`, read back as '').
The partition columns also stay inside each file with the same values, so readers that list the
files themselves (the planner, the report) need no partition logic.
"""

from __future__ import annotations

from urllib.parse import quote

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
_SAFE = "._-"  # with letters and digits, the only characters kept as they are (quote() keeps A-Za-z0-9_.-~)


def escape_value(value) -> str:
    """A partition value as a path segment: URL-quoted outside [A-Za-z0-9._-]; None -> Hive's null."""
    if value is None:
        return HIVE_NULL
    # An empty string stays empty (`dataset=`): DuckDB and pyarrow read that back as '', like the file.
    return quote(str(value), safe=_SAFE).replace("~", "%7E")


def hive_dir(keys: list[str], values: tuple) -> str:
    """`k1=v1/k2=v2` for the partition columns `keys` and one group's values."""
    return "/".join(f"{k}={escape_value(v)}" for k, v in zip(keys, values))


def split_by(table, keys: list[str]) -> list[tuple[str, object]]:
    """[(relative directory, sub-table)] of `table` grouped by the columns `keys`, in first-seen order.

    No keys: the whole table under "" (the flat layout). Rows keep their order within a group.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not keys or not table.num_rows:
        return [("", table)]
    columns = [table.column(k).to_pylist() for k in keys]
    groups: dict[tuple, list[int]] = {}
    for i, values in enumerate(zip(*columns)):
        groups.setdefault(values, []).append(i)
    return [(hive_dir(keys, values), pc.take(table, pa.array(idx, pa.int64()))) for values, idx in groups.items()]
