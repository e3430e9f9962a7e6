"""Partitioned output (`output.partition_by`): Hive directories, names by keys, readers, and a run on local Ray.

The Ray-free tests write through the sink; the pipeline test runs the built-in tiny Qwen2.5-VL
over a few synthetic videos with `partition_by: [dataset, mode]`, reads it back with DuckDB's
`hive_partitioning`, resumes it (nothing redone) and reports it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from videos import write_counter_video
from vreason_batch.config import config_from_dict
from vreason_batch.io.outputs import list_result_files
from vreason_batch.io.partitions import HIVE_NULL, escape_value, split_by
from vreason_batch.io.schema import empty_row, rows_to_table
from vreason_batch.job.plan import read_done_keys
from vreason_batch.job.results import ResultSink, RunResult, shard_key, write_partitioned

# Values that must each stay one path segment: a space, a '/', an '=', a '%', an empty string.
DATASETS = ["mm vu", "a/b=c", "50%", ""]


def table_of(pairs):
    rows = []
    for sample_id, mode, dataset in pairs:
        r = empty_row()
        r.update(schema_version=1, run_id="r", config_hash="h", model="m", sample_id=sample_id, mode=mode,
                 dataset=dataset, num_output_tokens=3)
        rows.append(r)
    return rows_to_table(rows)


def duckdb_counts(glob: str, *columns: str) -> Counter:
    import duckdb

    cols = ", ".join(columns)
    sql = f"SELECT {cols}, count(*) FROM read_parquet('{glob}', hive_partitioning=true) GROUP BY ALL"
    rows = duckdb.connect().execute(sql).fetchall()
    return Counter({tuple(r[:-1]): r[-1] for r in rows})


def test_values_are_escaped_to_one_path_segment():
    assert escape_value("mmvu") == "mmvu" and escape_value("Video-R1_v2.1") == "Video-R1_v2.1"
    assert escape_value("a/b=c") == "a%2Fb%3Dc" and escape_value("mm vu") == "mm%20vu" and escape_value("~") == "%7E"
    assert escape_value(None) == HIVE_NULL and escape_value("") == ""


def test_split_by_groups_rows_and_keeps_their_order():
    t = table_of([("1", "greedy", "x"), ("2", "vreason", "x"), ("3", "greedy", "y"), ("4", "greedy", "x")])
    groups = {d: part.column("sample_id").to_pylist() for d, part in split_by(t, ["dataset", "mode"])}
    assert groups == {"dataset=x/mode=greedy": ["1", "4"], "dataset=x/mode=vreason": ["2"], "dataset=y/mode=greedy": ["3"]}
    assert [d for d, _ in split_by(t, [])] == [""]


def test_sink_fills_whole_files_per_partition_named_by_their_keys(tmp_path):
    out = str(tmp_path / "out")
    # 12 samples x 2 modes over 4 datasets: 3 rows in each of the 8 partitions, in two tables
    pairs = [(f"s{i}", mode, DATASETS[i % len(DATASETS)]) for i in range(12) for mode in ("greedy", "vreason")]
    res = RunResult(run_id="r", output_uri=out)
    sink = ResultSink(out, rows_per_file=2, compression="zstd", flush_interval_s=3600, result=res,
                      partition_by=["dataset", "mode"])
    sink.add(table_of(pairs[:10]))
    sink.add(table_of(pairs[10:]))
    sink.close()
    files = list_result_files(out)
    assert res.rows_written == 24 and res.files_written == len(files) == 16
    sizes: dict[str, list[int]] = {}
    for f in files:
        part = pads.dataset(f, format="parquet").to_table()
        sizes.setdefault(os.path.relpath(os.path.dirname(f), out), []).append(part.num_rows)
        assert os.path.basename(f) == shard_key(part)  # named by the (sample_id, mode) keys it holds
    # each partition filled a file of rows_per_file rows across the two tables, the rest went at close
    assert {d: sorted(n) for d, n in sizes.items()} == {
        f"dataset={escape_value(d)}/mode={m}": [1, 2] for d in DATASETS for m in ("greedy", "vreason")}
    # DuckDB decodes the path: the partition columns read as the values in the files
    assert duckdb_counts(f"{out}/**/*.parquet", "dataset", "mode") == Counter((d, m) for _, m, d in pairs)
    # a retried write of a file's rows lands on its name, adding no file
    first = pads.dataset(files[0], format="parquet").to_table()
    assert write_partitioned(out, first, "zstd", ["dataset", "mode"]) == [files[0]] and list_result_files(out) == files
    # the planner reads the done keys through the partition directories, run records and temp files aside
    (tmp_path / "out" / "_runs").mkdir(exist_ok=True)
    write_partitioned(str(tmp_path / "out" / "_runs"), table_of([("zz", "greedy", "x")]), "zstd", ["dataset"])
    (tmp_path / "out" / "dataset=x").mkdir(exist_ok=True)
    (tmp_path / "out" / "dataset=x" / ".part-1.parquet.tmp").write_bytes(b"half a file")
    done = read_done_keys(out)
    assert sum(len(ids) for ids in done.by_mode.values()) == 24 and ("zz", "greedy") not in done


def test_sink_writes_every_partition_whose_rows_waited_flush_interval_s(tmp_path):
    import time

    out = str(tmp_path / "out")
    res = RunResult(run_id="r", output_uri=out)
    sink = ResultSink(out, rows_per_file=1000, compression="zstd", flush_interval_s=0.3, result=res,
                      partition_by=["mode"])
    sink.add(table_of([("1", "greedy", "x"), ("1", "vreason", "x"), ("2", "greedy", "x")]))
    deadline = time.monotonic() + 30
    while res.rows_written < 3 and time.monotonic() < deadline:  # the timer thread writes, not close()
        time.sleep(0.1)
    assert sorted(os.path.relpath(f, out).split("/")[0] for f in list_result_files(out)) == ["mode=greedy", "mode=vreason"]
    sink.close()
    assert (res.rows_written, res.files_written) == (3, 2)


def test_partitioned_output_on_s3_lists_plans_and_reports(s3_bucket):
    # '%' escapes are literal characters of S3 keys: boto3 lists them, pyarrow's S3 filesystem reads them
    from vreason_batch.evaluation.report import load_results

    out = f"s3://{s3_bucket}/out"
    pairs = [(f"s{i}", "greedy", DATASETS[i % len(DATASETS)]) for i in range(8)]
    written = write_partitioned(out, table_of(pairs), "zstd", ["dataset"])
    assert sorted(written) == list_result_files(out) and len(written) == len(DATASETS)
    assert f"{out}/dataset=a%2Fb%3Dc/" in " ".join(written)
    assert sum(len(ids) for ids in read_done_keys(out).by_mode.values()) == 8
    table = load_results(out, ["sample_id", "dataset"])
    assert sorted(zip(table.column("sample_id").to_pylist(), table.column("dataset").to_pylist())) == sorted(
        (s, d) for s, _, d in pairs)


def test_partition_by_is_validated():
    from vreason_batch.config import ConfigError

    base = {"input": {"manifest": "m.jsonl"}, "output": {"uri": "out"}}
    assert config_from_dict(base).output.partition_by == []
    assert config_from_dict(base, ["output.partition_by=[dataset, mode]"]).output.partition_by == ["dataset", "mode"]
    with pytest.raises(ConfigError, match=r"sample_id.*allowed: \['dataset', 'mode', 'model', 'problem_type'\]"):
        config_from_dict(base, ["output.partition_by=[sample_id]"])
    with pytest.raises(ConfigError, match="duplicates"):
        config_from_dict(base, ["output.partition_by=[mode, mode]"])


# ---------------------------------------------------------------------------------------------
# A partitioned run on local Ray


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.pipeline
def test_partitioned_run_reads_back_resumes_and_reports(local_ray, tmp_path):
    from vreason_batch.evaluation.report import write_report
    from vreason_batch.job.pipeline import run_job
    from vreason_batch.job.plan import plan_run

    videos = [write_counter_video(tmp_path / f"v{i}.mp4", num_frames=12 + i) for i in range(5)]
    datasets = ["mm vu", "mm vu", "tempo/ral", "", "mm vu"]
    rows = [{"id": f"s{i}", "video": str(v), "question": "Which frame is brightest?", "dataset": d}
            for i, (v, d) in enumerate(zip(videos, datasets))]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "out")
    cfg = config_from_dict({
        "model": {"name_or_path": "builtin:tiny-qwen2.5-vl", "dtype": "float32", "device": "cpu"},
        "decoding": {"modes": ["greedy", "vreason"], "max_new_tokens": 4},
        "video": {"num_frames": 2, "min_pixels": 3136, "max_pixels": 12544},
        "runtime": {"batch_size": 4, "num_gpus_per_actor": 0, "num_cpus_per_actor": 1, "video_workers": 1,
                    "progress_interval_s": 1.0},
        "input": {"manifest": str(manifest)},
        "output": {"uri": out, "rows_per_file": 3, "partition_by": ["dataset", "mode"]},
    })
    plan = plan_run(cfg)
    planned = Counter((s.dataset, m) for s, modes in plan.pending for m in modes)
    assert sum(planned.values()) == 10
    res = run_job(cfg, plan=plan)
    assert (res.rows_written, res.rows_failed) == (10, 0)
    dirs = sorted(p.parent.relative_to(out).as_posix() for p in Path(out).rglob("part-*.parquet"))
    assert set(dirs) == {f"dataset={escape_value(d)}/mode={m}" for d, m in planned} and len(planned) == 6
    assert duckdb_counts(f"{out}/**/*.parquet", "dataset", "mode") == planned
    # a filter on the partition columns (what lets DuckDB, Athena and Spark prune directories)
    import duckdb

    n = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{out}/**/*.parquet', hive_partitioning=true) "
                   "WHERE dataset = 'tempo/ral' AND mode = 'vreason'").fetchone()[0]
    assert n == 1

    # resume: every pair is done, nothing is written or touched
    before = {f: os.stat(f).st_mtime_ns for f in list_result_files(out)}
    again = run_job(cfg)
    assert (again.rows_written, again.files_written, again.skipped_done) == (0, 0, 10)
    assert {f: os.stat(f).st_mtime_ns for f in list_result_files(out)} == before

    summary = write_report(out, str(tmp_path / "report"))
    assert (summary["totals"]["n_rows"], summary["totals"]["n_duplicate_rows"]) == (10, 0)
    assert summary["totals"]["datasets"] == sorted({d for d, _ in planned})
    assert {d: sum(m["n_rows"] for m in modes.values()) for d, modes in summary["datasets"].items()} == Counter(
        d for d, _ in planned.elements())


def test_retry_errors_rewrites_each_file_inside_its_partition(tmp_path):
    import pyarrow as pa
    import pyarrow.compute as pc

    from vreason_batch.job.retry import RetrySink, find_targets, parse_types

    out = str(tmp_path / "out")
    first = table_of([(f"s{i}", m, DATASETS[i % 2]) for i in range(4) for m in ("greedy", "vreason")])
    failed = pc.equal(first.column("sample_id"), "s1")  # s1's rows failed, for a reason that went away
    first = first.set_column(first.schema.get_field_index("error_type"), "error_type",
                             pc.if_else(failed, pa.scalar("video_not_found"), pa.nulls(first.num_rows, pa.string())))
    write_partitioned(out, first, "zstd", ["dataset", "mode"])
    before = sorted(list_result_files(out))
    targets = find_targets(out, parse_types(None))
    assert set(targets.file_of) == {("s1", "greedy"), ("s1", "vreason")}
    for key in targets.file_of:
        targets.schedule(key)
    base = ResultSink(out, 2, "zstd", 60.0, RunResult("r2", out), partition_by=["dataset", "mode"])
    sink = RetrySink(base, targets, "zstd")
    retried = first.filter(failed).set_column(first.schema.get_field_index("error_type"), "error_type",
                                              pa.nulls(2, pa.string()))  # now results
    sink.add(retried)
    sink.add(retried)  # a restarted pipeline sends them again: written and counted once
    assert sink.rows_finished == 2
    sink.close()
    assert sorted(list_result_files(out)) == before  # same files, same partition directories
    assert (sink.result.rows_retried, sink.result.rows_retry_succeeded) == (2, 2)
    counts = duckdb_counts(str(tmp_path / "out" / "**" / "*.parquet"), "sample_id", "mode")
    assert set(counts.values()) == {1} and len(counts) == 8
    t = pads.dataset(out, format="parquet").to_table(columns=["error_type"])
    assert t.column("error_type").null_count == 8
