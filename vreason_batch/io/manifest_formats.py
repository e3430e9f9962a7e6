"""Manifest files as rows: format detection, and the JSONL, JSON, Parquet and CSV readers, streamed.

`iter_rows` is what jobs read: (row number, row dict) in bounded memory, a malformed JSONL line as
a `BadLine` (one error row later, not a failed run). `parse_rows` is the strict whole-file parser.
A file that cannot be read at all raises `ManifestError`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

from vreason_batch.io import storage

FORMATS_BY_EXTENSION = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
}


class ManifestError(ValueError):
    """A manifest that cannot be read at all; the message is meant for the command line."""


def detect_format(uri: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    for ext, found in FORMATS_BY_EXTENSION.items():
        if name.endswith(ext):
            return found
    known = ", ".join(FORMATS_BY_EXTENSION)
    raise ManifestError(f"cannot tell the format of manifest {uri} from its extension ({known}); set input.format")


def _text(data: bytes, uri: str) -> str:
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheet tools prepend a byte-order mark
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest {uri} is not UTF-8 text: {e}") from None


def _check_objects(items: list[Any], uri: str, what: str) -> list[dict[str, Any]]:
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise ManifestError(f"manifest {uri}: {what} {n} is a {type(item).__name__}, not an object")
    return items


@dataclass
class BadLine:
    """A manifest line that is not a JSON object: carried on as a bad_manifest_row, never fatal."""

    text: str
    problem: str


def _jsonl_rows(lines: Iterator[bytes], uri: str) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
    """(line number, row) for each non-blank line; a line that is not a JSON object is a BadLine.

    At corpus scale one malformed line is a fact of life, so it costs one error row, not the run.
    """
    decode = json.JSONDecoder().decode
    for line_no, raw in enumerate(lines, 1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # byte-order mark from spreadsheet tools
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield line_no, BadLine(raw.decode("utf-8", "replace").strip(), f"not UTF-8 text: {e}")
            continue
        if not line.strip():
            continue
        try:
            row = decode(line)
        except json.JSONDecodeError as e:
            yield line_no, BadLine(line.strip(), f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if isinstance(row, dict):
            yield line_no, row
        else:
            yield line_no, BadLine(line.strip(), f"a JSON {type(row).__name__}, not an object")


def parse_rows(data: bytes, fmt: str, uri: str) -> list[dict[str, Any]]:
    """The rows of a whole manifest file's bytes, as dicts. Raises ManifestError when unparseable.

    Strict (a malformed JSONL line raises): `iter_rows` is the lenient streaming reader jobs use.
    """
    if fmt == "jsonl":
        rows = []
        for line_no, row in _jsonl_rows(iter(data.splitlines()), uri):
            if isinstance(row, BadLine):
                raise ManifestError(f"manifest {uri}: line {line_no} is {row.problem}")
            rows.append(row)
        return rows
    if fmt == "json":
        try:
            doc = json.loads(_text(data, uri))
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest {uri} is not valid JSON: {e}") from None
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            doc = doc["data"]
        if not isinstance(doc, list):
            raise ManifestError(f'manifest {uri}: expected a JSON list of objects or {{"data": [...]}}')
        return _check_objects(doc, uri, "item")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(pa.BufferReader(data)).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise ManifestError(f"manifest {uri} is not a readable Parquet file: {e}") from None
    if fmt == "csv":
        try:
            return list(csv.DictReader(io.StringIO(_text(data, uri), newline="")))
        except csv.Error as e:
            raise ManifestError(f"manifest {uri} is not valid CSV: {e}") from None
    raise ManifestError(f"unknown manifest format {fmt!r}")


PARQUET_BATCH_ROWS = 65_536


def iter_rows(uri: str, fmt: str) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
    """(row number, row) of a manifest, streamed: memory stays bounded whatever the manifest's size.

    JSONL is read line by line (row number = line number; a malformed line is a BadLine), CSV row
    by row, Parquet a row group batch at a time. A JSON document is one value and is read whole.
    Raises ManifestError when the file cannot be read at all.
    """
    try:
        if fmt == "jsonl":
            yield from _jsonl_rows(storage.iter_lines(uri), uri)
        elif fmt == "csv":
            lines = (_text(b, uri) for b in storage.iter_lines(uri, keep_ends=True))
            try:
                yield from enumerate(csv.DictReader(lines), 1)
            except csv.Error as e:
                raise ManifestError(f"manifest {uri} is not valid CSV: {e}") from None
        elif fmt == "parquet":
            yield from _parquet_rows(uri)
        else:
            yield from enumerate(parse_rows(storage.read_bytes(uri), fmt, uri), 1)
    except storage.NotFound:
        raise ManifestError(f"manifest not found: {uri}") from None
    except storage.StorageError as e:
        raise ManifestError(f"cannot read manifest {uri}: {e}") from None


def _parquet_rows(uri: str) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_fs(uri)
    try:
        f = pq.ParquetFile(path, filesystem=fs)
    except FileNotFoundError:
        raise storage.NotFound(f"{uri}: no such file") from None
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"manifest {uri} is not a readable Parquet file: {e}") from None
    n = 0
    for batch in f.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            n += 1
            yield n, row

