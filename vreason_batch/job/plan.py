"""Planning, on the driver before any cluster work: the (sample, mode) pairs left to do.

It streams the manifest, looks at what the output already holds, and lists what is left, in
bounded memory.

The pending samples are grouped by video (`group_by_video`) and cut into Ray input blocks at
video boundaries (`input_blocks`), so that every video is decoded once per run, by one video
task, however many questions ask about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from vreason_batch.config import Config, ConfigError
from vreason_batch.io.outputs import RUNS_DIR, list_result_files
from vreason_batch.io.schema import Sample

if TYPE_CHECKING:
    from vreason_batch.job.retry import RetryTargets


class OutputConflict(ConfigError):
    """The output location holds results of a different config."""


# Pending samples are kept as Arrow tables of this many rows, never as one Python object per
# sample: a 10M-row corpus plans in bounded memory and reaches Ray as Arrow blocks.
PLAN_CHUNK_SAMPLES = 16_384
PLAN_SCHEMA_FIELDS = (
    ("sample_id", "string"), ("video", "string"), ("question", "string"), ("dataset", "string"),
    ("options", "list"), ("answer_gt", "string"), ("problem_type", "string"), ("error_type", "string"),
    ("error", "string"), ("modes", "list"),
)


def plan_schema():
    """The Arrow schema of pending samples: a Sample's fields plus the modes still to do."""
    import pyarrow as pa

    return pa.schema([(n, pa.list_(pa.string()) if t == "list" else pa.string()) for n, t in PLAN_SCHEMA_FIELDS])


class _PendingChunk:
    """Column lists for up to PLAN_CHUNK_SAMPLES pending samples, turned into one Arrow table."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {n: [] for n, _ in PLAN_SCHEMA_FIELDS}

    def add(self, s: Sample, modes: list[str]) -> None:
        c = self.cols
        c["sample_id"].append(s.sample_id)
        c["video"].append(s.video)
        c["question"].append(s.question)
        c["dataset"].append(s.dataset)
        c["options"].append(s.options)
        c["answer_gt"].append(s.answer_gt)
        c["problem_type"].append(s.problem_type)
        c["error_type"].append(s.error_type)
        c["error"].append(s.error)
        c["modes"].append(modes)

    def __len__(self) -> int:
        return len(self.cols["sample_id"])

    def table(self):
        import pyarrow as pa

        return pa.table(self.cols, schema=plan_schema())


@dataclass
class RunPlan:
    run_id: str
    config_hash: str
    pending_tables: list  # pyarrow Tables in plan_schema(): samples with modes still to do (empty on a dry run)
    num_samples: int
    num_pairs_total: int
    num_pairs_done: int
    manifest_summary: str
    duplicates_in_output: int = 0
    num_pairs_pending: int = 0
    num_samples_pending: int = 0
    num_videos_pending: int = 0  # distinct videos among the pending samples; a sample without a video counts as one
    retry: RetryTargets | None = None  # --retry-errors: the error rows scheduled again (job/retry.py)

    @property
    def pending(self) -> Iterator[tuple[Sample, list[str]]]:
        """(sample, modes still to do), built one at a time from the Arrow tables (small runs, tests)."""
        for t in self.pending_tables:
            for row in t.to_pylist():
                modes = row.pop("modes")
                yield Sample(**row), modes


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


@dataclass
class DoneKeys:
    """What the output already holds: sample ids per mode, the config hashes seen, duplicates."""

    by_mode: dict[str, set[str]] = field(default_factory=dict)
    config_hashes: set[str] = field(default_factory=set)
    duplicates: int = 0  # rows whose (sample_id, mode) appears in an earlier row too

    def __contains__(self, key: tuple[str, str]) -> bool:
        sample_id, mode = key
        return sample_id in self.by_mode.get(mode, ())


def read_done_keys(uri: str) -> DoneKeys:
    """The (sample_id, mode) keys already written under `uri`, read column-wise (three columns only)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from vreason_batch.io import storage

    files = list_result_files(uri)
    done = DoneKeys()
    if not files:
        return done
    fs, _ = storage.pyarrow_fs(uri)
    paths = [storage.pyarrow_fs(f)[1] for f in files]
    cols = ["sample_id", "mode", "config_hash"]
    table = storage.retry(lambda: pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=cols), what=uri)
    done.config_hashes = set(pc.unique(table.column("config_hash")).to_pylist())
    n_keys = 0
    for mode in pc.unique(table.column("mode")).to_pylist():
        ids = table.filter(pc.equal(table.column("mode"), pa.scalar(mode))).column("sample_id").to_pylist()
        done.by_mode[mode] = set(ids)
        n_keys += len(done.by_mode[mode])
    done.duplicates = table.num_rows - n_keys
    return done


def clear_output(uri: str) -> int:
    """--overwrite: delete this job's result objects and run records (nothing else under uri)."""
    from vreason_batch.io import storage

    removed = 0
    for f in list_result_files(uri):
        storage.delete_prefix(f)
        removed += 1
    runs = storage.join(uri, RUNS_DIR)
    if storage.exists(runs):
        removed += storage.delete_prefix(runs)
    return removed


def plan_run(cfg: Config, overwrite: bool = False, dry_run: bool = False, run_id: str | None = None,
             retry: RetryTargets | None = None) -> RunPlan:
    """Stream the manifest, look at what is already written, and list what is left to do.

    Memory: the ids seen (to drop duplicates), the keys already written, and the pending samples
    as Arrow tables (not kept on a dry run), grouped by video once the manifest is read. With `overwrite`, the job's results are deleted first;
    with `dry_run` too, nothing is deleted and the plan shows what an overwriting run would do.
    With `retry` (job/retry.py), its error rows are not done: they are scheduled, and recorded in it.
    """
    from vreason_batch.io.manifest import ManifestReader

    reader = ManifestReader(cfg.input)
    chash = cfg.config_hash()
    if overwrite and not dry_run:
        clear_output(cfg.output.uri)
    done = DoneKeys() if overwrite else read_done_keys(cfg.output.uri)
    others = done.config_hashes - {chash}
    if others:
        raise OutputConflict(
            f"{cfg.output.uri} already holds results of another config (hash {sorted(others)[0]}; this one is "
            f"{chash}). Use --overwrite to replace them, or another output.uri."
        )
    modes = list(cfg.decoding.modes)
    for sample_id, mode in retry.file_of if retry is not None else ():  # error rows to do again
        done.by_mode.get(mode, set()).discard(sample_id)
    done_sets = [done.by_mode.get(m, set()) for m in modes]
    tables, chunk = [], _PendingChunk()
    n_done = n_pairs_pending = n_samples_pending = 0
    for s in reader:
        todo = [m for m, ids in zip(modes, done_sets) if s.sample_id not in ids]
        n_done += len(modes) - len(todo)
        if not todo:
            continue
        n_pairs_pending += len(todo)
        n_samples_pending += 1
        if retry is not None:
            retry.schedule_pending(s.sample_id, todo)
        if dry_run:
            continue
        chunk.add(s, todo)
        if len(chunk) >= PLAN_CHUNK_SAMPLES:
            tables.append(chunk.table())
            chunk = _PendingChunk()
    if len(chunk):
        tables.append(chunk.table())
    tables, n_videos = group_by_video(tables)
    return RunPlan(
        run_id=run_id or new_run_id(),
        config_hash=chash,
        pending_tables=tables,
        num_samples=reader.num_samples,
        num_pairs_total=reader.num_samples * len(modes),
        num_pairs_done=n_done,
        manifest_summary=reader.summary(),
        duplicates_in_output=done.duplicates,
        num_pairs_pending=n_pairs_pending,
        num_samples_pending=n_samples_pending,
        num_videos_pending=n_videos,
        retry=retry,
    )


def _video_run_starts(video):
    """Row indices where a run of one video starts in a `video` column ([0, ...], sorted).

    Samples without a video (text questions: "" or null) share nothing, so each is a run of one.
    """
    import numpy as np
    import pyarrow.compute as pc

    n = len(video)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    has_video = pc.fill_null(pc.not_equal(video, ""), False).to_numpy(zero_copy_only=False)
    same = pc.fill_null(pc.equal(video[1:], video[:-1]), False).to_numpy(zero_copy_only=False)
    continues = same & has_video[1:]  # [n-1]: row i+1 continues row i's video
    return np.concatenate([[0], np.flatnonzero(~continues) + 1]).astype(np.int64)


def group_by_video(tables: list, chunk_rows: int = PLAN_CHUNK_SAMPLES) -> tuple[list, int]:
    """Pending tables -> the same samples with each video's samples adjacent; and the number of videos.

    Videos keep the order of their first sample, and samples keep manifest order within a video,
    so a manifest already grouped (annotation mode, one question per video) is not copied at all.
    Otherwise the rows are reordered one column at a time, so the peak is the pending samples plus
    two columns and the sort order (12 bytes a sample), never two copies of the table. The tables
    returned hold at least `chunk_rows` rows each (the last excepted), cut where a video starts,
    so no video spans two tables. `tables` is emptied: its buffers move into the result.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if not tables:
        return [], 0
    table = pa.concat_tables(tables)
    tables.clear()
    video = table.column("video")
    # codes in order of first appearance: index_in over unique() (which keeps that order)
    codes = pc.index_in(video, value_set=pc.unique(video)).to_numpy(zero_copy_only=False)
    del video
    if len(codes) > 1 and (np.diff(codes) < 0).any():
        order = np.argsort(codes, kind="stable")
        index_chunks = [pa.array(order[i:i + chunk_rows]) for i in range(0, len(order), chunk_rows)]
        del order
        schema, columns = table.schema, []
        for name in schema.names:
            column = table.column(name)
            table = table.drop_columns([name])
            try:
                # one array: take() over many chunks is ~5x slower; the chunks are freed right here
                column = column.combine_chunks()
            except (pa.ArrowInvalid, pa.ArrowCapacityError):  # over 2 GiB of text in one column: keep the chunks
                pass
            columns.append(pa.chunked_array([column.take(ix) for ix in index_chunks], type=schema.field(name).type))
            del column
        table = pa.Table.from_arrays(columns, schema=schema)
    del codes
    starts = _video_run_starts(table.column("video"))
    n, out, i = table.num_rows, [], 0
    while i < n:
        p = int(np.searchsorted(starts, i + chunk_rows))  # first video starting at or after i + chunk_rows
        j = int(starts[p]) if p < len(starts) else n
        out.append(table.slice(i, j - i))
        i = j
    return out, len(starts)


def input_blocks(plan: RunPlan, k: int) -> list:
    """The plan's pending samples as Ray input blocks of about `k` samples, never splitting a video.

    A block ends at the last video start at or before `k` samples; when a single video has more
    than `k` pending samples, its block holds that whole video (so it may exceed `k`). Blocks are
    zero-copy slices of the pending tables.
    """
    import numpy as np

    blocks = []
    for t in plan.pending_tables:
        starts = _video_run_starts(t.column("video"))
        n, i = t.num_rows, 0
        while i < n:
            end = i + k
            if end >= n:
                j = n
            else:
                p = int(np.searchsorted(starts, end, side="right")) - 1  # last video start <= end
                if starts[p] > i:
                    j = int(starts[p])
                else:  # one video from i past end: the whole video
                    j = int(starts[p + 1]) if p + 1 < len(starts) else n
            blocks.append(t.slice(i, j - i))
            i = j
    return blocks
