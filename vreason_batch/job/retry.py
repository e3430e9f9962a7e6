"""--retry-errors: error rows of the named types decoded again, each replaced in its own file, exactly once.

The planner finds the error rows to retry and the file each sits in (`find_targets`) and
schedules those (sample, mode) pairs again. Their new rows never go to new files: `RetrySink`
holds them until every retried row of a file is back, then rewrites that file with the new rows
in place of the error rows. The rewritten file holds the same (sample_id, mode) keys, so it keeps
its name (results.shard_key), and the rewrite is one atomic object (local: temp file + rename;
S3: one PUT): a reader sees the old file or the new one, never both rows. A run killed before a
file's rewrite loses only that file's new rows; the error rows are still there, and the next
`--retry-errors` run retries them again. Rows that fail again are replaced by their new error.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass, field

from vreason_batch.io.schema import ERROR_TYPES

# The error types a later run may not hit again: the video arrives later (not found / zero bytes
# while an upload runs), the model ran out of memory or failed on a sick device, or a bug was fixed.
TRANSIENT_ERROR_TYPES = ("video_not_found", "video_empty", "decode_error", "out_of_memory", "internal_error")


def parse_types(text: str | None) -> tuple[str, ...]:
    """`--retry-errors [TYPE,...]`: the named error types, or the transient ones when none is named."""
    if not text:
        return TRANSIENT_ERROR_TYPES
    types = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in types if t not in ERROR_TYPES]
    if unknown:
        raise ValueError(f"--retry-errors: unknown error type(s) {unknown}; known: {', '.join(ERROR_TYPES)}")
    return types


@dataclass
class RetryTargets:
    """Error rows to retry: the file holding each (sample_id, mode), and which of them this run scheduled."""

    types: tuple[str, ...]
    file_of: dict[tuple[str, str], str] = field(default_factory=dict)
    scheduled: dict[str, set[tuple[str, str]]] = field(default_factory=lambda: defaultdict(set))  # file -> keys

    num_scheduled_total: int = 0  # as first planned (the run record's figure)

    def schedule(self, key: tuple[str, str]) -> None:
        keys = self.scheduled[self.file_of[key]]
        if key not in keys:
            keys.add(key)
            self.num_scheduled_total += 1

    def schedule_pending(self, sample_id: str, modes: list[str]) -> None:
        """The planner schedules these modes of a sample: record those that are retried error rows."""
        for m in modes:
            if (sample_id, m) in self.file_of:
                self.schedule((sample_id, m))


def find_targets(uri: str, types: tuple[str, ...]) -> RetryTargets:
    """The error rows of `types` under `uri`, with their files (three columns read, error rows only)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from vreason_batch.io import storage
    from vreason_batch.io.outputs import list_result_files

    targets = RetryTargets(types)
    files = list_result_files(uri)
    if not files:
        return targets
    fs, _ = storage.pyarrow_fs(uri)
    uri_of = {storage.pyarrow_fs(f)[1]: f for f in files}
    dataset = pads.dataset(list(uri_of), filesystem=fs, format="parquet")
    wanted = pc.field("error_type").isin(list(types))

    def scan() -> None:
        targets.file_of.clear()
        for tagged in dataset.scanner(columns=["sample_id", "mode"], filter=wanted).scan_batches():
            f = uri_of[tagged.fragment.path]
            for sid, mode in zip(tagged.record_batch.column(0).to_pylist(), tagged.record_batch.column(1).to_pylist()):
                targets.file_of[(sid, mode)] = f

    storage.retry(scan, what=uri)
    return targets


def rewrite_file(uri: str, new_rows, compression: str) -> None:
    """Replace the rows of file `uri` whose (sample_id, mode) are in `new_rows` by those rows, in one write.

    The file keeps its name (results.write_shard names a file by the keys it holds: the same keys).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from vreason_batch.io import storage
    from vreason_batch.io.schema import OUTPUT_COLUMNS, OUTPUT_SCHEMA
    from vreason_batch.job.results import shard_key, write_shard

    old = storage.retry(lambda: pq.read_table(io.BytesIO(storage.read_bytes(uri))), what=uri)
    new_rows = new_rows.select(list(OUTPUT_COLUMNS)).cast(OUTPUT_SCHEMA)
    replaced = set(zip(new_rows.column("sample_id").to_pylist(), new_rows.column("mode").to_pylist()))
    keys = pc.binary_join_element_wise(old.column("sample_id"), old.column("mode"), "\t")
    gone = pc.is_in(keys, value_set=pa.array([f"{s}\t{m}" for s, m in replaced]))
    kept = old.filter(pc.invert(gone)).select(list(OUTPUT_COLUMNS)).cast(OUTPUT_SCHEMA)
    table = pa.concat_tables([kept, new_rows])
    folder, name = uri.rsplit("/", 1)
    if shard_key(table) != name:
        raise RuntimeError(f"retrying {uri}: the new rows are not the keys the file holds; nothing written")
    write_shard(folder, table, compression)


class RetrySink:
    """A ResultSink in front of which the retried rows are taken out and written back into their own files."""

    def __init__(self, base, targets: RetryTargets, compression: str) -> None:
        self.base, self.targets, self.compression = base, targets, compression
        self._waiting: dict[str, list] = defaultdict(list)  # file -> new row tables received
        self._received: dict[str, set] = defaultdict(set)  # file -> retried keys back, not yet written
        self._written: set[tuple[str, str]] = set()  # retried keys already back in their files
        self.result = base.result

    @property
    def rows_finished(self) -> int:
        # each retried key once: back in its file, or received and waiting for the file's other keys
        return self.base.rows_finished + len(self._written) + sum(len(k) for k in self._received.values())

    def add(self, table) -> None:
        import pyarrow as pa

        if not table.num_rows:
            return
        keys = list(zip(table.column("sample_id").to_pylist(), table.column("mode").to_pylist()))
        mine = [k in self.targets.file_of or k in self._written for k in keys]
        if not any(mine):
            return self.base.add(table)
        self.base.add(table.filter(pa.array([not m for m in mine])))
        for i, key in enumerate(keys):
            if mine[i] and key not in self._written:  # (a restarted pipeline may send a row twice)
                f = self.targets.file_of[key]
                self._waiting[f].append(table.slice(i, 1))
                self._received[f].add(key)
                if self._received[f] >= self.targets.scheduled[f]:
                    self._rewrite(f)

    def _rewrite(self, f: str) -> None:
        import pyarrow as pa

        from vreason_batch.job.results import tally

        if self.base.before_write is not None:
            self.base.before_write()  # the lease: a run that lost it must not write
        new = pa.concat_tables(self._waiting.pop(f), promote_options="default")
        new = _last_per_key(new)
        rewrite_file(f, new, self.compression)
        tally(self.result, new)
        self.result.rows_retried += new.num_rows
        self.result.rows_retry_succeeded += new.num_rows - _failed(new)
        del self._received[f]
        for key in self.targets.scheduled.pop(f):
            self.targets.file_of.pop(key, None)
            self._written.add(key)

    def flush(self) -> None:
        self.base.flush()

    def close(self, write: bool = True) -> None:
        self.base.close(write)  # a file whose retried rows are not all back stays as it was (retried next time)


def _failed(table) -> int:
    return table.num_rows - table.column("error_type").null_count


def _last_per_key(table):
    """One row per (sample_id, mode): the last received (a restarted pipeline may send one twice)."""
    seen: dict[tuple[str, str], int] = {}
    for i, key in enumerate(zip(table.column("sample_id").to_pylist(), table.column("mode").to_pylist())):
        seen[key] = i
    return table.take(sorted(seen.values()))
