"""The driver's sink and the plan, without Ray: files every rows_per_file rows or flush_interval_s,
each row written once; pending samples kept as Arrow, blocks sized for Ray."""

from __future__ import annotations

import json
import time
from collections import Counter

import pyarrow.dataset as pads
import pytest

from vreason_batch.config import config_from_dict
from vreason_batch.job.pipeline import MAX_INPUT_BLOCKS, samples_per_block
from vreason_batch.job.plan import PLAN_CHUNK_SAMPLES, plan_run
from vreason_batch.job.results import ResultSink, RunResult, list_result_files, write_shard
from vreason_batch.io.schema import empty_row, rows_to_table


def result_table(ids, mode="greedy", error_type=None, config_hash="h"):
    rows = []
    for i in ids:
        r = empty_row()
        r.update(schema_version=1, run_id="r", config_hash=config_hash, model="m", sample_id=f"s{i}", mode=mode,
                 error_type=error_type, num_output_tokens=None if error_type else 3)
        rows.append(r)
    return rows_to_table(rows)


def written(uri):
    t = pads.dataset(uri, format="parquet").to_table(columns=["sample_id", "mode"])
    return Counter(zip(t.column("sample_id").to_pylist(), t.column("mode").to_pylist()))


def test_sink_writes_whole_files_of_rows_per_file_and_the_rest_at_close(tmp_path):
    out = str(tmp_path / "out")
    res = RunResult(run_id="r", output_uri=out)
    sink = ResultSink(out, rows_per_file=4, compression="zstd", flush_interval_s=3600, result=res)
    for start, n in [(0, 3), (3, 3), (6, 1), (7, 5)]:  # blocks of any size, as Ray delivers them
        sink.add(result_table(range(start, start + n), error_type="video_not_found" if start == 6 else None))
    assert (sink.rows_finished, res.rows_written, res.files_written) == (12, 12, 3)
    sink.add(result_table([12, 13]))
    assert res.rows_written == 12  # 2 rows wait for more, or for the flush interval
    sink.close()
    assert (res.rows_written, res.files_written, res.rows_failed) == (14, 4, 1)
    assert res.failed_by_type == {"video_not_found": 1} and res.output_tokens == 13 * 3
    counts = written(out)
    assert set(counts) == {(f"s{i}", "greedy") for i in range(14)} and set(counts.values()) == {1}


def test_sink_flushes_on_time_while_the_stream_is_quiet(tmp_path):
    out = str(tmp_path / "out")
    res = RunResult(run_id="r", output_uri=out)
    sink = ResultSink(out, rows_per_file=1000, compression="zstd", flush_interval_s=0.3, result=res)
    sink.add(result_table([1, 2, 3]))
    assert res.rows_written == 0
    deadline = time.monotonic() + 10
    while res.rows_written < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # no add(): only the timer can write these
    assert (res.rows_written, res.files_written) == (3, 1)
    sink.add(result_table([4]))
    sink.close()
    assert (res.rows_written, res.files_written) == (4, 2) and len(list_result_files(out)) == 2


def test_sink_reports_a_failed_timed_write_to_the_driver(tmp_path, monkeypatch):
    import vreason_batch.job.results as results

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(results, "write_shard", broken)
    sink = ResultSink(str(tmp_path), rows_per_file=1000, compression="zstd", flush_interval_s=0.2,
                      result=RunResult(run_id="r", output_uri=str(tmp_path)))
    sink.add(result_table([1]))
    time.sleep(1.0)
    with pytest.raises(OSError, match="disk full"):
        sink.add(result_table([2]))


def test_plan_keeps_pending_samples_as_arrow_and_skips_done_pairs(tmp_path):
    manifest = tmp_path / "m.jsonl"
    n = PLAN_CHUNK_SAMPLES + 10
    manifest.write_text("".join(json.dumps({"id": f"s{i}", "video": f"v{i}.mp4", "question": "q"}) + "\n" for i in range(n)))
    out = str(tmp_path / "out")
    cfg = config_from_dict({"input": {"manifest": str(manifest)}, "output": {"uri": out},
                            "decoding": {"modes": ["greedy", "vreason"]}})
    write_shard(out, result_table(range(5), mode="greedy", config_hash=cfg.config_hash()), "zstd")  # 5 pairs done
    plan = plan_run(cfg)
    assert (plan.num_pairs_total, plan.num_pairs_done, plan.num_pairs_pending) == (2 * n, 5, 2 * n - 5)
    assert plan.num_samples_pending == n and [t.num_rows for t in plan.pending_tables] == [PLAN_CHUNK_SAMPLES, 10]
    first = next(iter(plan.pending))
    assert first[0].sample_id == "s0" and first[1] == ["vreason"]
    dry = plan_run(cfg, dry_run=True)
    assert dry.pending_tables == [] and dry.num_pairs_pending == plan.num_pairs_pending


@pytest.mark.parametrize(
    "num_samples, actors, cap, expected",
    [(12, 1, 32, 2), (1, 1, 32, 1), (10_000, 1, 32, 32), (10_000, 4, 8, 8), (200, 100, 32, 1),
     (40 * MAX_INPUT_BLOCKS, 1, 32, 40)],
)
def test_samples_per_block(num_samples, actors, cap, expected, tmp_path):
    cfg = config_from_dict({"input": {"manifest": "m.jsonl"}, "output": {"uri": str(tmp_path)},
                            "runtime": {"num_actors": actors, "max_samples_per_block": cap}})
    assert samples_per_block(cfg, num_samples) == expected


def test_sink_never_writes_once_before_write_refuses(tmp_path):
    """The driver passes lease.check: a run whose lease was taken over writes nothing more."""
    out = str(tmp_path / "out")
    allowed = {"ok": True}

    def check():
        if not allowed["ok"]:
            raise RuntimeError("lease lost")

    res = RunResult(run_id="r", output_uri=out)
    sink = ResultSink(out, rows_per_file=2, compression="zstd", flush_interval_s=3600, result=res, before_write=check)
    sink.add(result_table([1, 2, 3]))
    sink.flush()
    assert (res.rows_written, res.files_written) == (3, 2)
    allowed["ok"] = False
    with pytest.raises(RuntimeError, match="lease lost"):
        sink.add(result_table([4, 5]))
    sink.close(write=False)
    assert res.rows_written == 3 and len(list_result_files(out)) == 2
