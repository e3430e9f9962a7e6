"""Manifest readers (JSONL, JSON, Parquet, CSV; local or s3://), annotation mode, deterministic
sample ids and sharding.

Read on the driver before any cluster work, as a stream (`ManifestReader`): memory does not grow
with the manifest's size. A manifest that cannot be read at all raises `ManifestError`; a single
unusable row (a missing question, a JSONL line that is not valid JSON) becomes a `Sample` with
error_type="bad_manifest_row", so that it is written to the output exactly once instead of
silently dropped or failing the whole run.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any

from vreason_batch.io import storage
from vreason_batch.config import AnnotateConfig, ColumnMap, InputConfig
from vreason_batch.io.schema import PROBLEM_TYPES, Sample

FORMATS_BY_EXTENSION = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
}
MAX_DUPLICATE_EXAMPLES = 10
SAMPLE_ID_HEX_CHARS = 16

# Video-R1 style ground truth: "<answer>B</answer>" (possibly with reasoning around it).
_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL | re.IGNORECASE)


class ManifestError(ValueError):
    """A manifest that cannot be read at all; the message is meant for the command line."""


def _summary(r, num_samples: int) -> str:
    """One line on what a manifest gave: a ManifestResult or a ManifestReader after its pass."""
    parts = [f"{num_samples} samples from {r.num_rows} rows of {r.source} ({r.format})"]
    if r.num_duplicates:
        parts.append(f"{r.num_duplicates} duplicates dropped (e.g. {', '.join(r.duplicate_ids[:3])})")
    if r.num_bad_rows:
        parts.append(f"{r.num_bad_rows} bad rows kept as error rows")
    if r.num_over_limit:
        parts.append(f"{r.num_over_limit} left out by input.limit")
    return "; ".join(parts)


@dataclass
class ManifestResult:
    samples: list[Sample]  # unique by sample_id, manifest order, `limit` applied
    source: str  # the manifest URI, or the annotated videos location
    format: str  # jsonl | json | parquet | csv | annotate
    num_rows: int  # rows read (annotation: videos x questions)
    num_duplicates: int = 0  # rows dropped because an earlier row had the same sample_id
    duplicate_ids: list[str] = field(default_factory=list)  # a few of those ids
    num_bad_rows: int = 0  # samples carried as bad_manifest_row error rows
    num_over_limit: int = 0  # unique samples left out by input.limit

    def summary(self) -> str:
        return _summary(self, len(self.samples))


# ---------------------------------------------------------------------------------------------
# Ids and sharding


def make_sample_id(video: str, question: str, options: list[str]) -> str:
    """Stable id of a sample without an id column: sha256 of (resolved video URI, question, options)."""
    blob = json.dumps([video, question, options], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:SAMPLE_ID_HEX_CHARS]


def shard_key(sample_id: str, num_shards: int) -> int:
    """The shard (0..num_shards-1) of a sample: a stable hash, the same in every process and run."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    digest = hashlib.sha256(sample_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


# ---------------------------------------------------------------------------------------------
# Field normalisation


def _missing(value: Any) -> bool:
    """None, NaN (pandas-written Parquet / CSV) and blank strings all mean "no value"."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


def normalize_answer(value: Any) -> str | None:
    """Ground truth as a string: 3 -> "3", 3.0 -> "3", 2.5 -> "2.5", "<answer>B</answer>" -> "B"."""
    if _missing(value):
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        text = value.strip()
        tagged = _ANSWER_TAG.search(text)
        if tagged:
            text = tagged.group(1).strip()
        return text or None
    return json.dumps(value, ensure_ascii=False)


def _normalize_id(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # an integer id read back as float (CSV via pandas, Parquet with nulls)
    return str(value).strip()


def _parse_options(value: Any) -> list[str]:
    """A list, or a JSON-encoded list string (CSV cells). Raises ValueError otherwise."""
    if _missing(value):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"options {value[:80]!r} is not a JSON list") from None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"options must be a list, got {type(value).__name__}")
    return [str(o).strip() for o in value]


def _normalize_problem_type(value: Any) -> str:
    # Video-R1 writes "multiple choice" and "free-form".
    return str(value).strip().lower().replace(" ", "_").replace("-", "_")


def resolve_video(video: str, base: str | None) -> str:
    """An absolute local path or s3:// URI for a manifest's video entry.

    Relative entries are joined onto `base` (a local directory or s3:// prefix); with no base,
    onto the current directory.
    """
    video = video.strip()
    if base is not None and _plain_relative(video):  # the common case, 10M times a corpus: no normpath
        return _base_prefix(base) + video
    scheme, bucket, path = storage.parse_uri(video)  # raises StorageError for http:// and friends
    if bucket is not None:
        return video
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    if base is not None and storage.is_s3(base):
        _, base_bucket, base_key = storage.parse_uri(base)
        key = posixpath.normpath(posixpath.join(base_key, path))
        return f"s3://{base_bucket}/{key}"
    return os.path.normpath(os.path.join(os.path.abspath(base or os.getcwd()), path))


def _plain_relative(video: str) -> bool:
    """A relative path that normpath would leave as it is: no scheme, ~, ., .., // or trailing /."""
    return (
        bool(video) and "://" not in video and not video.startswith(("/", "~"))
        and "//" not in video and "/." not in "/" + video and not video.endswith("/")
    )


@functools.lru_cache(maxsize=16)
def _base_prefix(base: str) -> str:
    """What resolve_video puts before a plain relative path under `base`, ending in "/"."""
    if storage.is_s3(base):
        _, bucket, key = storage.parse_uri(base)
        key = posixpath.normpath(key) if key.strip("/") else key.rstrip("/")
        return f"s3://{bucket}/{key}/" if key else f"s3://{bucket}/"
    return os.path.abspath(base).rstrip("/") + "/"


# ---------------------------------------------------------------------------------------------
# Rows -> samples


def _row_to_sample(
    row: dict[str, Any], number: int, cols: ColumnMap, base: str | None, dataset: str, text_only: bool = False
) -> Sample:
    """One manifest row -> one Sample; an unusable row -> an error Sample (never an exception).

    `number` is the 1-based row number, used in messages and in ids of rows without one.
    """
    problems: list[str] = []
    raw_video, raw_question = row.get(cols.video), row.get(cols.question)

    video = ""
    if text_only:
        video = "" if _missing(raw_video) else str(raw_video)
    elif _missing(raw_video):
        problems.append(f"no video (column {cols.video!r})")
    else:
        try:
            video = resolve_video(str(raw_video), base)
        except storage.StorageError as e:
            problems.append(f"video {raw_video!r}: {e}")
            video = str(raw_video)

    question = "" if _missing(raw_question) else str(raw_question).strip()
    if not question:
        problems.append(f"no question (column {cols.question!r})")

    try:
        options = _parse_options(row.get(cols.options))
    except ValueError as e:
        problems.append(str(e))
        options = []

    raw_type = row.get(cols.problem_type)
    if _missing(raw_type):
        problem_type = "multiple_choice" if options else "free_form"
    else:
        problem_type = _normalize_problem_type(raw_type)
        if problem_type not in PROBLEM_TYPES:
            problems.append(f"unknown problem_type {raw_type!r} (expected one of {', '.join(PROBLEM_TYPES)})")
            problem_type = "multiple_choice" if options else "free_form"

    raw_id = row.get(cols.id)
    if not _missing(raw_id):
        sample_id = _normalize_id(raw_id)
    elif problems:
        # A broken row has no reliable (video, question) to hash; its position and raw content give
        # an id that is stable across runs of the same manifest. str keys: a CSV row with extra
        # cells has a None key, which sort_keys cannot order.
        raw = {str(k): v for k, v in row.items()}
        content = json.dumps([number, raw], sort_keys=True, ensure_ascii=False, default=str)
        sample_id = f"row{number}-" + hashlib.sha256(content.encode("utf-8")).hexdigest()[:12]
    else:
        sample_id = make_sample_id(video, question, options)

    raw_dataset = row.get(cols.dataset)
    return Sample(
        sample_id=sample_id,
        video=video,
        question=question,
        dataset=dataset if _missing(raw_dataset) else str(raw_dataset).strip(),
        options=options,
        answer_gt=normalize_answer(row.get(cols.answer)),
        problem_type=problem_type,
        error_type="bad_manifest_row" if problems else None,
        error=(f"manifest row {number}: " + "; ".join(problems)) if problems else None,
    )


# ---------------------------------------------------------------------------------------------
# Reading files


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


def _manifest_dir(uri: str) -> str:
    if storage.is_s3(uri):
        return uri.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(storage.parse_uri(uri)[2]))


def _dataset_name(uri: str) -> str:
    """The default dataset name: the manifest's file name without its extension."""
    return os.path.splitext(uri.rstrip("/").rsplit("/", 1)[-1])[0]


ID_CHUNK = 8192


def _batched(items: Iterator[Sample], n: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class IdSet:
    """The sample ids seen so far, 16 bytes each: a set of 10M id strings would take ~1.5 GB.

    Each id is kept as its 128-bit BLAKE2b digest (two uint64, `hi` and `lo`) in a few sorted
    runs of geometric sizes (merged like an LSM tree), so adding a chunk costs a few vectorised
    binary searches. Two different ids share a digest with probability ~n^2 / 2^129 (1e-25 for
    10M ids): never, in practice.
    """

    def __init__(self) -> None:
        self.runs: list[tuple[Any, Any]] = []  # (hi sorted ascending, lo in the same order)

    def add_new(self, ids: list[str]) -> list[bool]:
        """For each id, in order: whether it is new (not seen before, nor earlier in `ids`). Records all."""
        import numpy as np

        digests = [hashlib.blake2b(i.encode("utf-8"), digest_size=16).digest() for i in ids]
        first: dict[bytes, int] = {}
        for k, d in enumerate(digests):
            first.setdefault(d, k)
        new = np.zeros(len(ids), dtype=bool)
        new[np.fromiter(first.values(), dtype=np.int64, count=len(first))] = True
        q = np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(-1, 2)  # [n, (hi, lo)]
        order = np.argsort(q[:, 0])
        q_hi = q[order, 0]  # sorted queries: searchsorted walks the run once, cache-friendly
        for hi, lo in self.runs:
            left = np.searchsorted(hi, q_hi)
            for j in np.flatnonzero(hi[np.minimum(left, len(hi) - 1)] == q_hi):
                k, pos = order[j], left[j]
                while new[k] and pos < len(hi) and hi[pos] == q_hi[j]:  # equal hi: rare, compare lo
                    new[k] = lo[pos] != q[k, 1]
                    pos += 1
        fresh = q[new]
        if len(fresh):
            by_hi = np.argsort(fresh[:, 0], kind="stable")
            self._push(fresh[by_hi, 0].copy(), fresh[by_hi, 1].copy())
        return new.tolist()

    def _push(self, hi, lo) -> None:
        import numpy as np

        self.runs.append((hi, lo))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (h2, l2), (h1, l1) = self.runs.pop(), self.runs.pop()
            h, lo_ = np.concatenate([h1, h2]), np.concatenate([l1, l2])
            by_hi = np.argsort(h, kind="stable")
            self.runs.append((h[by_hi], lo_[by_hi]))


class ManifestReader:
    """A job's input as a stream of Samples: manifest rows, or annotated videos x questions.

    De-duplicated by sample_id (first wins), then cut to `cfg.limit`. One pass, in bounded memory
    besides the ids seen (16 bytes each, `IdSet`): iterate once, then read the counts
    (`num_rows`, `num_duplicates`, ...) and `summary()`. Raises ManifestError, at the end of the
    pass and so before any cluster work, when the input has no rows or lacks a required column.
    """

    def __init__(self, cfg: InputConfig):
        self.cfg = cfg
        if cfg.annotate is not None:
            self.source, self.format = cfg.annotate.videos, "annotate"
        else:
            assert cfg.manifest is not None
            self.source, self.format = cfg.manifest, detect_format(cfg.manifest, cfg.format)
        self.num_rows = 0  # rows read (annotation: videos x questions)
        self.num_samples = 0  # unique samples yielded
        self.num_duplicates = 0  # rows dropped because an earlier row had the same sample_id
        self.duplicate_ids: list[str] = []  # a few of those ids
        self.num_bad_rows = 0  # yielded samples carried as bad_manifest_row error rows
        self.num_over_limit = 0  # unique samples left out by input.limit

    def __iter__(self) -> Iterator[Sample]:
        seen = IdSet()
        limit = self.cfg.limit
        for chunk in _batched(self._samples(), ID_CHUNK):
            for s, new in zip(chunk, seen.add_new([s.sample_id for s in chunk])):
                self.num_rows += 1
                if not new:
                    self.num_duplicates += 1
                    if len(self.duplicate_ids) < MAX_DUPLICATE_EXAMPLES and s.sample_id not in self.duplicate_ids:
                        self.duplicate_ids.append(s.sample_id)
                    continue
                if limit is not None and self.num_samples >= limit:
                    self.num_over_limit += 1
                    continue
                self.num_samples += 1
                if s.error_type is not None:
                    self.num_bad_rows += 1
                yield s

    def _samples(self) -> Iterator[Sample]:
        if self.cfg.annotate is not None:
            yield from _annotation_samples(self.cfg.annotate)
            return
        cfg, uri = self.cfg, self.source
        cols = cfg.columns
        base = cfg.video_root if cfg.video_root is not None else _manifest_dir(uri)
        dataset = _dataset_name(uri)
        required = [getattr(cols, role) for role in (("question",) if cfg.text_only else ("video", "question"))]
        present: set[str] = set()
        missing = set(required)
        first_bad: str | None = None
        n_good = 0
        for number, row in iter_rows(uri, self.format):
            if isinstance(row, BadLine):
                first_bad = first_bad or f"line {number} is {row.problem}"
                yield _bad_line_sample(row, number, dataset)
                continue
            n_good += 1
            if missing:  # column names are gathered only until every required one was seen
                present.update(str(k) for k in row)
                missing.difference_update(row)
            yield _row_to_sample(row, number, cols, base, dataset, cfg.text_only)
        if not n_good:
            why = f": {first_bad}" if first_bad else ""
            raise ManifestError(f"manifest {uri} has no rows{why}")
        for name in required:
            if name in missing:
                role = next(r for r in ("video", "question") if getattr(cols, r) == name)
                found = ", ".join(sorted(present))
                hint = f"set input.columns.{role}"
                if role == "video":
                    hint += "; for text questions to a text model set input.text_only: true"
                raise ManifestError(f"manifest {uri} has no {role} column {name!r} ({hint}); columns found: {found}")

    def summary(self) -> str:
        return _summary(self, self.num_samples)


def _bad_line_sample(line: BadLine, number: int, dataset: str) -> Sample:
    """A line that is not a JSON object: an error Sample whose id is stable for the same manifest."""
    content = json.dumps([number, line.text], ensure_ascii=False)
    return Sample(
        sample_id=f"row{number}-" + hashlib.sha256(content.encode("utf-8")).hexdigest()[:12],
        video="",
        question="",
        dataset=dataset,
        error_type="bad_manifest_row",
        error=f"manifest line {number}: {line.problem}: {line.text[:200]!r}",
    )


def _annotation_samples(ann: AnnotateConfig) -> Iterator[Sample]:
    try:
        videos = storage.list_files(ann.videos, ann.pattern)
    except storage.StorageError as e:
        raise ManifestError(f"input.annotate.videos: cannot list {ann.videos}: {e}") from None
    if not videos:
        raise ManifestError(f"input.annotate.videos: no files matching {ann.pattern!r} under {ann.videos}")
    cols = ColumnMap()
    n = 0
    for v in videos:
        for q in ann.questions:
            n += 1
            yield _row_to_sample({cols.video: v, cols.question: q}, n, cols, None, ann.dataset)


def read_samples(cfg: InputConfig) -> ManifestResult:
    """All samples of a job's input, in memory (small inputs, tests); jobs stream `ManifestReader`."""
    reader = ManifestReader(cfg)
    samples = list(reader)
    return ManifestResult(
        samples=samples,
        source=reader.source,
        format=reader.format,
        num_rows=reader.num_rows,
        num_duplicates=reader.num_duplicates,
        duplicate_ids=reader.duplicate_ids,
        num_bad_rows=reader.num_bad_rows,
        num_over_limit=reader.num_over_limit,
    )
