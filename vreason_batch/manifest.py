"""Manifest readers (JSONL, JSON, Parquet, CSV; local or s3://), annotation mode, deterministic
sample ids and sharding.

Read on the driver before any cluster work: a manifest that cannot be read at all raises
`ManifestError`; a single unusable row becomes a `Sample` with error_type="bad_manifest_row",
so that it is written to the output exactly once instead of silently dropped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from vreason_batch import storage
from vreason_batch.config import AnnotateConfig, ColumnMap, InputConfig
from vreason_batch.schema import PROBLEM_TYPES, Sample

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
        parts = [f"{len(self.samples)} samples from {self.num_rows} rows of {self.source} ({self.format})"]
        if self.num_duplicates:
            parts.append(f"{self.num_duplicates} duplicates dropped (e.g. {', '.join(self.duplicate_ids[:3])})")
        if self.num_bad_rows:
            parts.append(f"{self.num_bad_rows} bad rows kept as error rows")
        if self.num_over_limit:
            parts.append(f"{self.num_over_limit} left out by input.limit")
        return "; ".join(parts)


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
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


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


def _dedupe(samples: list[Sample]) -> tuple[list[Sample], int, list[str]]:
    """Keep the first sample of each sample_id; count the rest and name a few."""
    seen: set[str] = set()
    unique: list[Sample] = []
    examples: list[str] = []
    dropped = 0
    for s in samples:
        if s.sample_id in seen:
            dropped += 1
            if len(examples) < MAX_DUPLICATE_EXAMPLES and s.sample_id not in examples:
                examples.append(s.sample_id)
            continue
        seen.add(s.sample_id)
        unique.append(s)
    return unique, dropped, examples


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


def parse_rows(data: bytes, fmt: str, uri: str) -> list[dict[str, Any]]:
    """The rows of a manifest file's bytes, as dicts. Raises ManifestError when unparseable."""
    if fmt == "jsonl":
        rows = []
        for line_no, line in enumerate(_text(data, uri).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ManifestError(f"manifest {uri}: line {line_no} is not valid JSON: {e}") from None
        return _check_objects(rows, uri, "row")
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


def _manifest_dir(uri: str) -> str:
    if storage.is_s3(uri):
        return uri.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(storage.parse_uri(uri)[2]))


def _dataset_name(uri: str) -> str:
    """The default dataset name: the manifest's file name without its extension."""
    return os.path.splitext(uri.rstrip("/").rsplit("/", 1)[-1])[0]


def _read_manifest(cfg: InputConfig) -> tuple[list[Sample], int, str]:
    uri = cfg.manifest
    assert uri is not None
    fmt = detect_format(uri, cfg.format)
    try:
        data = storage.read_bytes(uri)
    except storage.NotFound:
        raise ManifestError(f"manifest not found: {uri}") from None
    except storage.StorageError as e:
        raise ManifestError(f"cannot read manifest {uri}: {e}") from None
    rows = parse_rows(data, fmt, uri)
    if not rows:
        raise ManifestError(f"manifest {uri} has no rows")

    cols = cfg.columns
    present = set().union(*(row.keys() for row in rows))
    for role in ("question",) if cfg.text_only else ("video", "question"):
        name = getattr(cols, role)
        if name not in present:
            found = ", ".join(sorted(str(c) for c in present))
            hint = f"set input.columns.{role}"
            if role == "video":
                hint += "; for text questions to a text model set input.text_only: true"
            raise ManifestError(f"manifest {uri} has no {role} column {name!r} ({hint}); columns found: {found}")

    base = cfg.video_root if cfg.video_root is not None else _manifest_dir(uri)
    dataset = _dataset_name(uri)
    samples = [_row_to_sample(row, n, cols, base, dataset, cfg.text_only) for n, row in enumerate(rows, 1)]
    return samples, len(rows), fmt


def _annotation_samples(ann: AnnotateConfig) -> tuple[list[Sample], int]:
    try:
        videos = storage.list_files(ann.videos, ann.pattern)
    except storage.StorageError as e:
        raise ManifestError(f"input.annotate.videos: cannot list {ann.videos}: {e}") from None
    if not videos:
        raise ManifestError(f"input.annotate.videos: no files matching {ann.pattern!r} under {ann.videos}")
    cols = ColumnMap()
    rows = [{cols.video: v, cols.question: q} for v in videos for q in ann.questions]
    samples = [_row_to_sample(row, n, cols, None, ann.dataset) for n, row in enumerate(rows, 1)]
    return samples, len(rows)


def read_samples(cfg: InputConfig) -> ManifestResult:
    """All samples of a job's input: manifest rows, or annotated videos x questions.

    De-duplicated by sample_id (first wins), then cut to `cfg.limit`.
    """
    if cfg.annotate is not None:
        samples, num_rows = _annotation_samples(cfg.annotate)
        source, fmt = cfg.annotate.videos, "annotate"
    else:
        samples, num_rows, fmt = _read_manifest(cfg)
        source = cfg.manifest
    unique, num_duplicates, duplicate_ids = _dedupe(samples)
    kept = unique[: cfg.limit] if cfg.limit is not None else unique
    return ManifestResult(
        samples=kept,
        source=source,
        format=fmt,
        num_rows=num_rows,
        num_duplicates=num_duplicates,
        duplicate_ids=duplicate_ids,
        num_bad_rows=sum(1 for s in kept if s.error_type is not None),
        num_over_limit=len(unique) - len(kept),
    )
