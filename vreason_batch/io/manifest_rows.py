"""One manifest row as one Sample: field normalisation, video paths, deterministic sample ids and sharding.

A row never raises here: an unusable one (no question, options that are not a list, a video URI
of an unsupported scheme) becomes a Sample with error_type="bad_manifest_row" naming every problem.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import posixpath
import re
from typing import TYPE_CHECKING, Any

from vreason_batch.io import storage
from vreason_batch.config import ColumnMap
from vreason_batch.io.schema import PROBLEM_TYPES, Sample

if TYPE_CHECKING:
    from vreason_batch.io.manifest_formats import BadLine

SAMPLE_ID_HEX_CHARS = 16

# Video-R1 style ground truth: "<answer>B</answer>" (possibly with reasoning around it).
_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL | re.IGNORECASE)


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
#
# Each field's reader appends what is wrong with its column to `problems`, in column order; a row
# with any problem becomes an error Sample whose message lists them all.


def row_to_sample(
    row: dict[str, Any], number: int, cols: ColumnMap, base: str | None, dataset: str, text_only: bool = False
) -> Sample:
    """One manifest row -> one Sample; an unusable row -> an error Sample (never an exception).

    `number` is the 1-based row number, used in messages and in ids of rows without one.
    """
    problems: list[str] = []
    video = _video_field(row.get(cols.video), cols, base, text_only, problems)

    raw_question = row.get(cols.question)
    question = "" if _missing(raw_question) else str(raw_question).strip()
    if not question:
        problems.append(f"no question (column {cols.question!r})")

    options = _options_field(row.get(cols.options), problems)
    problem_type = _problem_type_field(row.get(cols.problem_type), options, problems)
    sample_id = _row_sample_id(row, number, cols, video, question, options, problems)

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


def _video_field(raw_video: Any, cols: ColumnMap, base: str | None, text_only: bool, problems: list[str]) -> str:
    """The row's video resolved against `base`; a text-only row keeps its entry as written (or "")."""
    if text_only:
        return "" if _missing(raw_video) else str(raw_video)
    if _missing(raw_video):
        problems.append(f"no video (column {cols.video!r})")
        return ""
    try:
        return resolve_video(str(raw_video), base)
    except storage.StorageError as e:
        problems.append(f"video {raw_video!r}: {e}")
        return str(raw_video)


def _options_field(value: Any, problems: list[str]) -> list[str]:
    try:
        return _parse_options(value)
    except ValueError as e:
        problems.append(str(e))
        return []


def _problem_type_field(raw_type: Any, options: list[str], problems: list[str]) -> str:
    """The row's problem_type; without one (or with an unknown one), guessed from having options."""
    if _missing(raw_type):
        return "multiple_choice" if options else "free_form"
    problem_type = _normalize_problem_type(raw_type)
    if problem_type not in PROBLEM_TYPES:
        problems.append(f"unknown problem_type {raw_type!r} (expected one of {', '.join(PROBLEM_TYPES)})")
        return "multiple_choice" if options else "free_form"
    return problem_type


def _row_sample_id(
    row: dict[str, Any], number: int, cols: ColumnMap, video: str, question: str, options: list[str], problems: list[str]
) -> str:
    """The id column if there is one; else a hash of (video, question, options), or for a broken row
    of its position and raw content."""
    raw_id = row.get(cols.id)
    if not _missing(raw_id):
        return _normalize_id(raw_id)
    if problems:
        # A broken row has no reliable (video, question) to hash; its position and raw content give
        # an id that is stable across runs of the same manifest. str keys: a CSV row with extra
        # cells has a None key, which sort_keys cannot order.
        raw = {str(k): v for k, v in row.items()}
        content = json.dumps([number, raw], sort_keys=True, ensure_ascii=False, default=str)
        return f"row{number}-" + hashlib.sha256(content.encode("utf-8")).hexdigest()[:12]
    return make_sample_id(video, question, options)


def bad_line_sample(line: BadLine, number: int, dataset: str) -> Sample:
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
