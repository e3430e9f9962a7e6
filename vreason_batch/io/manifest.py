"""A job's input as a stream of Samples: manifest rows or annotated videos, de-duplicated and limited.

Read on the driver before any cluster work, as a stream (`ManifestReader`): memory does not grow
with the manifest's size. A manifest that cannot be read at all raises `ManifestError`; a single
unusable row (a missing question, a JSONL line that is not valid JSON) becomes a `Sample` with
error_type="bad_manifest_row", so that it is written to the output exactly once instead of
silently dropped or failing the whole run. The files' formats (JSONL, JSON, Parquet, CSV; local or
s3://) are read by manifest_formats.py; a row becomes a Sample, with its deterministic id, in
manifest_rows.py.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any

from vreason_batch.io import storage
from vreason_batch.config import AnnotateConfig, ColumnMap, InputConfig
from vreason_batch.io.manifest_formats import BadLine, ManifestError, detect_format, iter_rows
from vreason_batch.io.manifest_rows import bad_line_sample, row_to_sample
from vreason_batch.io.schema import Sample

MAX_DUPLICATE_EXAMPLES = 10


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
    """The sample ids seen so far, 24 bytes each: a set of 10M id strings would take ~1.5 GB.

    Each id is kept as its 128-bit BLAKE2b digest (two uint64, `hi` and `lo`), with a 64-bit digest
    of what the sample asks (`sample_identity`) beside it, in a few sorted runs of geometric sizes
    (merged like an LSM tree), so adding a chunk costs a few vectorised binary searches. Two
    different ids share a digest with probability ~n^2 / 2^129 (1e-25 for 10M ids): never, in
    practice.
    """

    def __init__(self) -> None:
        self.runs: list[tuple[Any, Any, Any]] = []  # (hi sorted ascending, lo and content in the same order)

    def add_new(self, ids: list[str], contents: list[bytes] | None = None) -> list[bool]:
        """For each id, in order: whether it is new (not seen before, nor earlier in `ids`). Records all.

        With `contents` (one digest per id), an id seen before with other content is a conflict:
        its index in `ids` is in `self.conflicts` afterwards (an exact repeat is not).
        """
        import numpy as np

        digests = [hashlib.blake2b(i.encode("utf-8"), digest_size=16).digest() for i in ids]
        content = np.zeros(len(ids), dtype=np.uint64)
        if contents is not None:  # 8-byte digests, read as uint64
            content = np.frombuffer(b"".join(hashlib.blake2b(c, digest_size=8).digest() for c in contents), dtype=np.uint64)
        first: dict[bytes, int] = {}
        first_of = np.fromiter((first.setdefault(d, k) for k, d in enumerate(digests)), dtype=np.int64, count=len(ids))
        known = content.copy()  # at each id's first index in `ids`: the content it was first seen with
        new = np.zeros(len(ids), dtype=bool)
        new[np.fromiter(first.values(), dtype=np.int64, count=len(first))] = True
        q = np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(-1, 2)  # [n, (hi, lo)]
        order = np.argsort(q[:, 0])
        q_hi = q[order, 0]  # sorted queries: searchsorted walks the run once, cache-friendly
        for hi, lo, seen_content in self.runs:
            left = np.searchsorted(hi, q_hi)
            for j in np.flatnonzero(hi[np.minimum(left, len(hi) - 1)] == q_hi):
                k, pos = order[j], left[j]
                while new[k] and pos < len(hi) and hi[pos] == q_hi[j]:  # equal hi: rare, compare lo
                    if lo[pos] == q[k, 1]:
                        new[k], known[k] = False, seen_content[pos]
                    pos += 1
        self.conflicts = np.flatnonzero(content != known[first_of]).tolist()
        fresh = q[new]
        if len(fresh):
            by_hi = np.argsort(fresh[:, 0], kind="stable")
            self._push(fresh[by_hi, 0].copy(), fresh[by_hi, 1].copy(), content[new][by_hi].copy())
        return new.tolist()

    def _push(self, hi, lo, content) -> None:
        import numpy as np

        self.runs.append((hi, lo, content))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (h2, l2, c2), (h1, l1, c1) = self.runs.pop(), self.runs.pop()
            h, lo_, c = np.concatenate([h1, h2]), np.concatenate([l1, l2]), np.concatenate([c1, c2])
            by_hi = np.argsort(h, kind="stable")
            self.runs.append((h[by_hi], lo_[by_hi], c[by_hi]))


def sample_identity(s: Sample) -> bytes:
    """What makes two rows the same sample: its video, question and options (the fields an id stands
    for). Rows that share an id and agree on these are repeats (the first is kept); rows that
    share an id and differ in any of them are two samples under one id (`IdConflict`)."""
    return repr((s.video, s.question, list(s.options))).encode("utf-8", "surrogatepass")  # repr: unambiguous


class IdConflict(ManifestError):
    """Two manifest rows share an id but ask different things: refused before any cluster work."""


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
        for chunk in _batched(self._numbered(), ID_CHUNK):
            new = seen.add_new([s.sample_id for _, s in chunk], [sample_identity(s) for _, s in chunk])
            if seen.conflicts:
                number, s = chunk[seen.conflicts[0]]
                raise self._conflict(s, number)
            for (_, s), is_new in zip(chunk, new):
                self.num_rows += 1
                if not is_new:
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

    def _numbered(self) -> Iterator[tuple[int, Sample]]:
        """(row number, Sample): the manifest's row numbers, or 1-based positions in an annotation."""
        if self.cfg.annotate is not None:
            yield from enumerate(_annotation_samples(self.cfg.annotate), start=1)
        else:
            yield from self._samples()

    def _conflict(self, s: Sample, number: int) -> IdConflict:
        """The error for row `number` reusing `s.sample_id`: found by reading the input again up to it."""
        first = next(n for n, t in self._numbered() if t.sample_id == s.sample_id)
        where = "row" if self.cfg.annotate is None else "sample"
        return IdConflict(
            f"{self.source}: id {s.sample_id!r} is used by {where} {first} and by {where} {number}, which ask "
            "different things (another video, question or options); one of them would be dropped. Give every "
            "sample its own id (for concatenated benchmark files: prefix each file's ids), or leave the id "
            "column out so that ids are derived from video, question and options"
        )

    def _samples(self) -> Iterator[tuple[int, Sample]]:
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
                yield number, bad_line_sample(row, number, dataset)
                continue
            n_good += 1
            if missing:  # column names are gathered only until every required one was seen
                present.update(str(k) for k in row)
                missing.difference_update(row)
            yield number, row_to_sample(row, number, cols, base, dataset, cfg.text_only)
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
            yield row_to_sample({cols.video: v, cols.question: q}, n, cols, None, ann.dataset)


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
