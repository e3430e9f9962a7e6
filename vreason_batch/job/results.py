"""The output store: which files are results, how one is written, and the run records.

The output is a set of whole Parquet objects, each named by a hash of the (sample_id, mode)
keys it holds, so a retried write of the same rows lands on the same key and no reader ever sees
half a file (local: temp file + rename; S3: one PUT). With `output.partition_by` each file holds
one partition's rows, under its Hive-style directory (io/partitions.py). Run records live under `_runs/`; every
name starting with `_` or `.` (run records, temp files of shards being written) is not a result.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from vreason_batch import __version__
from vreason_batch.config import Config
from vreason_batch.io.outputs import RESULT_SUFFIX, RUNS_DIR, is_result_path, list_result_files  # noqa: F401 (re-exported)
from vreason_batch.io.partitions import split_by
from vreason_batch.io.schema import OUTPUT_COLUMNS, OUTPUT_SCHEMA, SCHEMA_VERSION

if TYPE_CHECKING:
    from vreason_batch.job.plan import RunPlan

# The run record's counts of work done, summed over the model actors' snapshots (stages.model.ModelStage)
WORK_COUNTS = ("video_decodes", "vision_encodes", "prefill_tokens")


@dataclass
class RunResult:
    run_id: str
    output_uri: str
    rows_written: int = 0
    rows_failed: int = 0
    files_written: int = 0
    skipped_done: int = 0
    output_tokens: int = 0
    per_mode: dict[str, dict[str, int]] = field(default_factory=dict)
    failed_by_type: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    rows_retried: int = 0  # --retry-errors: error rows decoded again and written back in their files
    rows_retry_succeeded: int = 0  # of those, rows that are results now (not errors)


def shard_key(table) -> str:
    """A deterministic object name from the (sample_id, mode) keys a file holds."""
    keys = sorted(zip(table.column("sample_id").to_pylist(), table.column("mode").to_pylist()))
    h = hashlib.sha256("\n".join(f"{s}\t{m}" for s, m in keys).encode()).hexdigest()[:20]
    return f"part-{h}{RESULT_SUFFIX}"


def write_shard(uri: str, table, compression: str) -> str:
    """Write one table as one whole object under `uri`; returns its URI."""
    import pyarrow.parquet as pq

    from vreason_batch.io import storage

    table = table.select(list(OUTPUT_COLUMNS)).cast(OUTPUT_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=None if compression == "none" else compression)
    dest = storage.join(uri, shard_key(table))
    storage.retry(lambda: storage.write_bytes(dest, buf.getvalue()), what=dest)
    return dest


def write_partitioned(uri: str, table, compression: str, partition_by: list[str],
                      result: RunResult | None = None) -> list[str]:
    """Write one table as one whole object per partition (`uri/k=v/.../part-<hash>.parquet`, or
    `uri/part-<hash>.parquet` without partition columns), each counted into `result`; their URIs."""
    from vreason_batch.io import storage

    written = []
    for rel, part in split_by(table, list(partition_by)):
        written.append(write_shard(storage.join(uri, rel) if rel else uri, part, compression))
        if result is not None:
            tally(result, part)
    return written


def tally(res: RunResult, table) -> None:
    """Count one written file's rows into the run's result."""
    rows = table.select(["mode", "error_type", "num_output_tokens"]).to_pylist()
    res.files_written += 1
    for r in rows:
        res.rows_written += 1
        pm = res.per_mode.setdefault(r["mode"], {"rows": 0, "failed": 0})
        pm["rows"] += 1
        if r["error_type"]:
            res.rows_failed += 1
            pm["failed"] += 1
            res.failed_by_type[r["error_type"]] = res.failed_by_type.get(r["error_type"], 0) + 1
        res.output_tokens += r["num_output_tokens"] or 0


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def work_counts(actor_metrics: dict[str, dict]) -> dict[str, int]:
    """WORK_COUNTS summed over the model actors' latest snapshots. Each actor stores its snapshot
    before returning a batch's rows, and a restarted actor reports under a new id, so a batch whose
    rows were written is counted once (a batch retried after its actor died counts its retry only)."""
    return {k: sum(int(snap.get(k) or 0) for snap in actor_metrics.values()) for k in WORK_COUNTS}


def write_run_record(cfg: Config, plan: RunPlan, status: str, result: RunResult | None = None, extra: dict | None = None) -> str:
    from vreason_batch.io import storage

    record = {
        "run_id": plan.run_id,
        "status": status,
        "schema_version": SCHEMA_VERSION,
        "code_version": code_version(),
        "config_hash": plan.config_hash,
        "model": cfg.model.name_or_path,
        "config": cfg.model_dump(mode="json"),
        "manifest": plan.manifest_summary,
        "counts": {
            "samples": plan.num_samples,
            "pairs_total": plan.num_pairs_total,
            "pairs_already_done": plan.num_pairs_done,
            "pairs_scheduled": plan.num_pairs_pending,
            "duplicates_in_output_before_run": plan.duplicates_in_output,
        },
        "retry_errors": None if plan.retry is None else {"types": list(plan.retry.types),
                                                         "rows_scheduled": plan.retry.num_scheduled_total},
        "written_at": datetime.now(timezone.utc).isoformat(),
    }
    if result is not None:
        record["counts"].update(
            rows_written=result.rows_written, rows_failed=result.rows_failed, files_written=result.files_written,
            per_mode=result.per_mode, failed_by_type=result.failed_by_type,
            rows_retried=result.rows_retried, rows_retry_succeeded=result.rows_retry_succeeded,
        )
        record["timings"] = {
            "wall_s": result.wall_s,
            "rows_per_s": result.rows_written / result.wall_s if result.wall_s else None,
            "output_tokens": result.output_tokens,
            "output_tokens_per_s": result.output_tokens / result.wall_s if result.wall_s else None,
        }
    if extra and "actor_metrics" in extra:
        record["counts"].update(work_counts(extra["actor_metrics"]))
    elif status == "finished":  # nothing was pending: no model actor ran
        record["counts"].update(dict.fromkeys(WORK_COUNTS, 0))
    if extra:
        record.update(extra)
    dest = storage.join(cfg.output.uri, RUNS_DIR, f"{plan.run_id}.json")
    storage.retry(lambda: storage.write_bytes(dest, json.dumps(record, indent=2, default=str).encode()), what=dest)
    return dest


class _Buffer:
    """One partition's finished rows waiting for a file: (monotonic arrival time, pyarrow Table), oldest first."""

    def __init__(self):
        self.tables: list = []
        self.rows = 0

    def take(self, n: int):
        """The oldest `n` rows as one table, removed from the buffer."""
        import pyarrow as pa

        parts, need = [], n
        while need:
            arrived, t = self.tables[0]
            if t.num_rows <= need:
                parts.append(t)
                self.tables.pop(0)
                need -= t.num_rows
            else:
                parts.append(t.slice(0, need))
                self.tables[0] = (arrived, t.slice(need))
                need = 0
        self.rows -= n
        return pa.concat_tables(parts, promote_options="default")


class ResultSink:
    """The driver's writer: result tables in from the stream, whole files out.

    A file is written every `rows_per_file` rows, and whatever is buffered once its oldest row has
    waited `flush_interval_s` (checked by a timer thread, since the stream may be quiet for long),
    so a killed driver loses at most that much finished work. With `partition_by`, rows are
    buffered per partition and each partition fills its own files (`rows_per_file` rows each), so
    a write makes whole files, not one sliver per partition. Each file is named by the keys it
    holds, so however the rows are grouped a row is written once. `rows_finished` counts rows
    received, `result.rows_written` rows in files.
    """

    def __init__(self, uri: str, rows_per_file: int, compression: str, flush_interval_s: float, result: RunResult,
                 before_write=None, partition_by: list[str] | tuple[str, ...] = ()):
        import threading

        self.uri, self.rows_per_file, self.compression = uri, rows_per_file, compression
        self.partition_by = list(partition_by)  # output.partition_by; [] = one buffer, the flat layout
        self.flush_interval_s, self.result = flush_interval_s, result
        self.before_write = before_write  # called before each file; raising stops the write
        self.rows_finished = 0
        self._buffers: dict[str, _Buffer] = {}  # partition directory ("" when flat) -> its rows
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._timer = threading.Thread(target=self._flush_on_time, name="vreason-sink-flush", daemon=True)
        self._timer.start()

    def add(self, table) -> None:
        """Take one result table from the stream; write every whole file it completes."""
        import time

        if self._error is not None:
            raise self._error
        if not table.num_rows:
            return
        with self._lock:
            self.rows_finished += table.num_rows
            now = time.monotonic()
            for rel, part in split_by(table, self.partition_by):
                buf = self._buffers.setdefault(rel, _Buffer())
                buf.tables.append((now, part))
                buf.rows += part.num_rows
                while buf.rows >= self.rows_per_file:
                    self._write_locked(rel, self.rows_per_file)

    def flush(self) -> None:
        """Write everything buffered now."""
        with self._lock:
            for rel, buf in list(self._buffers.items()):
                if buf.rows:
                    self._write_locked(rel, buf.rows)

    def close(self, write: bool = True) -> None:
        """Stop the timer and write what is left (or, with write=False, drop it)."""
        self._stop.set()
        self._timer.join()
        if write:
            self.flush()
        if self._error is not None:
            raise self._error

    def _write_locked(self, rel: str, n: int) -> None:
        """Write the oldest `n` buffered rows of the partition `rel` as one file."""
        from vreason_batch.io import storage

        if self.before_write is not None:
            self.before_write()
        buf = self._buffers[rel]
        # Taken only once the write succeeded: a failed write leaves the rows buffered.
        head = _Buffer()
        head.tables, head.rows = list(buf.tables), buf.rows
        table = head.take(n)
        write_shard(storage.join(self.uri, rel) if rel else self.uri, table, self.compression)
        buf.tables, buf.rows = head.tables, head.rows
        tally(self.result, table)

    def _flush_on_time(self) -> None:
        import time

        tick = min(1.0, self.flush_interval_s / 4)
        while not self._stop.wait(tick):
            with self._lock:
                now = time.monotonic()
                due = [rel for rel, buf in self._buffers.items()
                       if buf.tables and now - buf.tables[0][0] >= self.flush_interval_s]
                try:
                    for rel in due:
                        self._write_locked(rel, self._buffers[rel].rows)
                except Exception as e:  # noqa: BLE001 - handed to the driver's thread at its next add/close
                    self._error = e
                    return
