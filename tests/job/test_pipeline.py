"""The distributed job on local Ray: an S3 round trip, bad input, resume, an actor killed mid-batch,
a driver killed mid-run, and text-only questions.

Every run uses the built-in tiny Qwen2.5-VL (random weights) with a few frames and tokens, so a
run costs about as much as starting a model actor (~10 s on 2 cores). One local Ray serves the
in-process tests of this module; the killed-driver test runs the CLI in a subprocess with its own.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from procs import kill_pids, session_pids
from videos import real_video, write_counter_video, write_empty, write_text_as_mp4, write_truncated
from vreason_batch.io import storage
from vreason_batch.config import Config, config_from_dict
from vreason_batch.job.lease import LeaseHeld, current_holder
from vreason_batch.job.pipeline import run_job
from vreason_batch.job.plan import OutputConflict, plan_run
from vreason_batch.job.results import RUNS_DIR, ResultSink, RunResult
from vreason_batch.job.retry import TRANSIENT_ERROR_TYPES, RetrySink, find_targets, parse_types
from vreason_batch.io.schema import OUTPUT_SCHEMA, VIDEO_BACKENDS
from vreason_batch.job.stages.healing import ENGINE_FAULT_ENV
from vreason_batch.job.stages.model import FAULT_ENV

pytestmark = pytest.mark.pipeline

REPO = Path(__file__).resolve().parents[2]
MODES = ("greedy", "vreason")
ROWS_PER_FILE = 4
# Small enough that every run is quick; rows_per_file < rows, so each run writes several files.
TINY = {
    "model": {"name_or_path": "builtin:tiny-qwen2.5-vl"},
    "decoding": {"modes": list(MODES), "max_new_tokens": 6},
    "video": {"num_frames": 4, "min_pixels": 3136, "max_pixels": 12544},
    "runtime": {"batch_size": 4, "progress_interval_s": 1.0},
}
TRACES = ("entropy", "entropy_post", "entropy_ema", "alpha")

# Log lines operators alert on: Ray's C++ error level ("[date pid tid E] file.cc:N: ..." prints as
# "[... E <pid> <tid>]"), Python logging at ERROR / CRITICAL, and any Python warning
# (DeprecationWarning, RayDeprecationWarning, UserWarning, ...), from the driver or a worker.
NOISY_LINE = re.compile(r"^\[[^\]]* E \d+ \d+\]|\b(ERROR|CRITICAL)\b|\w*Warning: ")
# Ray 2.60's own lines that this job cannot avoid yet (README, "Logs"): Ray Data passes every
# actor-pool worker its DataContext and UDF as ObjectRefs, so any restartable pool logs the first;
# bounded retries have no named parameter in 2.60, so `max_retries` & co. still go through
# **ray_remote_args, which logs the second.
KNOWN_RAY_LINES = (
    "has constructor arguments in the object store and max_restarts > 0",
    "RayDeprecationWarning: `ray_remote_args` is deprecated",
)


def unexpected_noise(log_text: str) -> list[str]:
    return [line for line in log_text.splitlines()
            if NOISY_LINE.search(line) and not any(k in line for k in KNOWN_RAY_LINES)]


def tiny_config_dict(manifest: str, out: str) -> dict:
    return {**TINY, "input": {"manifest": manifest}, "output": {"uri": out, "rows_per_file": ROWS_PER_FILE}}


def tiny_config(manifest: str, out: str, *overrides: str) -> Config:
    return config_from_dict(tiny_config_dict(manifest, out), list(overrides))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def counter_rows(paths: list[str], start: int = 0) -> list[dict]:
    return [{"id": f"s{start + i}", "video": p, "question": f"Which frame is brightest? ({start + i})"}
            for i, p in enumerate(paths)]


def read_results(uri: str) -> pa.Table:
    """The whole output as a dataset reader sees it (run records under _runs/ are skipped)."""
    fs, path = storage.pyarrow_fs(uri)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def result_files(uri: str) -> list[str]:
    fs, path = storage.pyarrow_fs(uri)
    return sorted(pads.dataset(path, filesystem=fs, format="parquet").files)


def pair_counts(table: pa.Table) -> Counter:
    return Counter(zip(table.column("sample_id").to_pylist(), table.column("mode").to_pylist()))


def assert_exactly_once(table: pa.Table, sample_ids: list[str]) -> None:
    counts = pair_counts(table)
    expected = {(s, m) for s in sample_ids for m in MODES}
    assert set(counts) == expected, f"missing {expected - set(counts)}, unexpected {set(counts) - expected}"
    dupes = {k: n for k, n in counts.items() if n != 1}
    assert not dupes, f"(sample, mode) written more than once: {dupes}"


def assert_good_rows(rows: list[dict], video: bool = True) -> None:
    for r in rows:
        where = (r["sample_id"], r["mode"])
        assert r["error_type"] is None and r["error"] is None, (where, r["error"])
        n = r["num_output_tokens"]
        assert n and n > 0, where
        assert r["output_text"] is not None, where
        for trace in TRACES:
            assert len(r[trace]) == n, (where, trace, len(r[trace]), n)
        if video:
            assert r["num_video_tokens"] > 0 and r["num_frames"] == len(r["frame_indices"]) > 0, where
            assert r["video_backend"] in VIDEO_BACKENDS, where  # the reader that decoded it
        else:
            assert r["num_video_tokens"] == 0 and r["frame_indices"] is None and r["video_backend"] is None, where
        if r["mode"] == "greedy":  # the base model: no controller step, alpha 0 throughout
            assert not r["controller_updates"] and set(r["alpha"]) <= {0}, where


def run_record(uri: str, run_id: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(uri, RUNS_DIR, f"{run_id}.json")))


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def fault_marker(tmp_path_factory) -> Path:
    """The FAULT_ENV marker every model actor of this module's Ray sees; it exists, so the fault
    is disarmed. A test arms it by deleting the file: the next model batch then kills its actor."""
    marker = tmp_path_factory.mktemp("fault") / "fired"
    marker.write_text("disarmed")
    return marker


@pytest.fixture(scope="module")
def device_fault_marker(tmp_path_factory) -> Path:
    """The ENGINE_FAULT_ENV marker (disarmed). Deleted: the next model actor to decode gets a
    poisoned device for good; holding "always": every actor does."""
    marker = tmp_path_factory.mktemp("device-fault") / "poisoned"
    marker.write_text("disarmed")
    return marker


@pytest.fixture(scope="module")
def local_ray(s3_server, fault_marker, device_fault_marker):
    """One local Ray for the in-process tests; run_job joins it. Started after s3_server has set
    AWS_ENDPOINT_URL, which the workers inherit (they read videos from the moto server).
    Module scope: Ray is gone again before other modules (test_cli asserts it never starts)."""
    import ray

    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
        # env set after init would not reach workers
        runtime_env={"env_vars": {FAULT_ENV: str(fault_marker), ENGINE_FAULT_ENV: str(device_fault_marker)}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def counter_videos(tmp_path_factory) -> list[str]:
    """Ten small synthetic mp4s (64x48, 12-21 frames), shared by the tests of this module."""
    d = tmp_path_factory.mktemp("videos")
    return [str(write_counter_video(d / f"counter{i:02d}.mp4", num_frames=12 + i)) for i in range(10)]


# ---------------------------------------------------------------------------------------------
# 1. A full run with the manifest, videos and output on S3


def _duckdb_results(uri: str, endpoint: str):
    """A DuckDB connection with a `results` view over the output, and how it reads S3.

    DuckDB reads s3:// itself through its httpfs extension, which it downloads on first INSTALL;
    without it (offline CI) DuckDB queries the pyarrow dataset over storage.pyarrow_fs instead.
    """
    import duckdb

    con = duckdb.connect()
    try:
        con.execute("LOAD httpfs")
    except duckdb.Error:
        fs, path = storage.pyarrow_fs(uri)
        con.register("results", pads.dataset(path, filesystem=fs, format="parquet"))
        return con, "pyarrow.dataset"
    host = endpoint.split("://", 1)[1]
    con.execute(
        f"CREATE SECRET moto (TYPE s3, KEY_ID 'testing', SECRET 'testing', REGION 'us-east-1', "
        f"ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)"
    )
    con.execute(f"CREATE VIEW results AS SELECT * FROM read_parquet('{uri}/**/*.parquet')")
    return con, "httpfs"


def test_s3_round_trip(local_ray, s3_server, s3_bucket, counter_videos):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for p in counter_videos[:5]:
        s3.upload_file(p, s3_bucket, f"in/videos/{Path(p).name}")
    names = [Path(p).name for p in counter_videos[:5]]
    rows = [
        # relative to the manifest's S3 folder, and absolute
        *({"video": f"videos/{n}", "question": f"What is shown? ({n})"} for n in names[:3]),
        *({"video": f"s3://{s3_bucket}/in/videos/{n}", "question": "How many bands?"} for n in names[3:]),
        {"video": str(real_video("carphone_pristine.mp4")), "question": "What is the man holding?",
         "options": ["a phone", "a cup", "a book"], "answer": "A"},
    ]
    s3.put_object(Bucket=s3_bucket, Key="in/manifest.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows))
    out = f"s3://{s3_bucket}/out/results"
    cfg = tiny_config(f"s3://{s3_bucket}/in/manifest.jsonl", out)

    res = run_job(cfg)

    n_rows = len(rows) * len(MODES)
    assert (res.rows_written, res.rows_failed, res.skipped_done) == (n_rows, 0, 0)
    # rows_per_file respected: whole batches of 4 from the stream, not one file per sample
    assert res.files_written == math.ceil(n_rows / ROWS_PER_FILE) < len(rows)

    files = result_files(out)
    assert len(files) == res.files_written and all("/_runs/" not in f for f in files)
    fs, _ = storage.pyarrow_fs(out)
    for f in files:
        schema = pq.read_schema(f, filesystem=fs)
        assert schema.equals(OUTPUT_SCHEMA, check_metadata=False), f
        assert schema.metadata[b"vreason_batch.schema_version"] == OUTPUT_SCHEMA.metadata[b"vreason_batch.schema_version"]
        assert pq.ParquetFile(f, filesystem=fs).metadata.num_rows <= ROWS_PER_FILE

    table = read_results(out)
    assert table.schema.equals(OUTPUT_SCHEMA, check_metadata=False)
    sample_ids = sorted(set(table.column("sample_id").to_pylist()))
    assert len(sample_ids) == len(rows)
    assert_exactly_once(table, sample_ids)
    assert_good_rows(table.to_pylist())
    assert set(table.column("config_hash").to_pylist()) == {cfg.config_hash()}
    assert set(table.column("run_id").to_pylist()) == {res.run_id}
    assert {r["video"] for r in table.to_pylist()} >= {f"s3://{s3_bucket}/in/videos/{n}" for n in names}

    con, how = _duckdb_results(out, s3_server)
    total, distinct, failed, min_video_tokens, bad_traces = con.execute(
        "SELECT count(*), count(DISTINCT (sample_id, mode)), count(error_type), min(num_video_tokens), "
        "count(*) FILTER (WHERE len(entropy) != num_output_tokens OR len(alpha) != num_output_tokens "
        "  OR len(entropy_ema) != num_output_tokens OR len(entropy_post) != num_output_tokens) FROM results"
    ).fetchone()
    assert (total, distinct, failed, bad_traces) == (n_rows, n_rows, 0, 0), how
    assert min_video_tokens > 0, how
    per_mode = dict(con.execute("SELECT mode, count(*) FROM results GROUP BY mode").fetchall())
    assert per_mode == {m: len(rows) for m in MODES}, how

    record = run_record(out, res.run_id)
    assert record["status"] == "finished" and record["config_hash"] == cfg.config_hash()
    assert record["counts"]["pairs_total"] == record["counts"]["rows_written"] == n_rows
    assert record["counts"]["rows_failed"] == 0 and record["counts"]["files_written"] == len(files)
    assert record["actor_metrics"], "the model actors' metrics are in the run record"


# ---------------------------------------------------------------------------------------------
# 2. Bad input never stops the job


def _bad_input_manifest(tmp_path: Path, s3_bucket: str, counter_videos: list[str]) -> tuple[str, dict]:
    """A manifest of good samples and every kind of bad one; returns it and {id: (error_type, text in error)}."""
    d = tmp_path / "bad"
    d.mkdir()
    missing = str(d / "missing.mp4")
    empty = str(write_empty(d / "empty.mp4"))
    text = str(write_text_as_mp4(d / "text.mp4"))
    truncated = str(write_truncated(counter_videos[0], d / "truncated.mp4", 0.5))
    huge = str(write_counter_video(d / "huge.mp4", num_frames=8, width=128, height=96))
    no_key = f"s3://{s3_bucket}/videos/no-such-key.mp4"
    q = "What happens?"
    rows = [
        {"id": "good-0", "video": counter_videos[0], "question": q},
        {"id": "missing-file", "video": missing, "question": q},
        {"id": "missing-key", "video": no_key, "question": q},
        {"id": "good-1", "video": counter_videos[1], "question": q},
        {"id": "empty", "video": empty, "question": q},
        {"id": "text", "video": text, "question": q},
        {"id": "truncated", "video": truncated, "question": q},
        {"id": "no-question", "video": counter_videos[2], "question": "  "},
        {"id": "huge", "video": huge, "question": q},
        {"id": "good-2", "video": counter_videos[3], "question": q},
    ]
    expected = {
        "missing-file": ("video_not_found", missing),
        "missing-key": ("video_not_found", no_key),
        "empty": ("video_empty", empty),
        "text": ("video_unreadable", text),
        "truncated": ("video_unreadable", truncated),
        "no-question": ("bad_manifest_row", "manifest row 8: no question"),
        "huge": ("video_too_large", huge),
    }
    path = write_jsonl(d / "manifest.jsonl", rows)
    with open(path, "a") as f:  # a torn line, as a crashed writer leaves it: one error row, not a failed run
        f.write('{"id": "torn", "video": "' + counter_videos[4] + '", "quest\n')
    from vreason_batch.config import InputConfig
    from vreason_batch.io.manifest import read_samples

    torn = read_samples(InputConfig(manifest=path)).samples[-1].sample_id
    expected[torn] = ("bad_manifest_row", "manifest line 11: not valid JSON")
    return path, expected


def test_bad_input_becomes_error_rows(local_ray, s3_bucket, counter_videos, tmp_path, capsys):
    from vreason_batch.cli import main

    manifest, expected = _bad_input_manifest(tmp_path, s3_bucket, counter_videos)
    out = tmp_path / "out"
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config_dict(manifest, str(out))))

    # 128x96 sources are "absurd" here; the 64x48 counter videos pass
    rc = main(["run", str(cfg_path), "--set", "video.max_source_pixels=6144"])  # the CLI: plan_run + run_job

    printed = capsys.readouterr().out
    assert rc == 0, printed
    n_bad, n_good = len(expected), 3
    n_rows, n_failed = (n_bad + n_good) * len(MODES), n_bad * len(MODES)
    done_line = next(line for line in printed.splitlines() if "[vreason-batch] done:" in line)
    assert f" {n_rows} rows" in done_line and f", {n_failed} failed" in done_line, done_line

    run_id = done_line.split("run ", 1)[1].split(":", 1)[0]
    record = run_record(str(out), run_id)
    assert record["status"] == "finished"
    counts = record["counts"]
    assert (counts["rows_written"], counts["rows_failed"]) == (n_rows, n_failed)
    assert counts["failed_by_type"] == dict(Counter(t for t, _ in expected.values() for _ in MODES))
    assert counts["per_mode"] == {m: {"rows": n_bad + n_good, "failed": n_bad} for m in MODES}

    table = read_results(str(out))
    assert_exactly_once(table, [*expected, "good-0", "good-1", "good-2"])
    rows = table.to_pylist()
    for r in rows:
        if r["sample_id"] in expected:
            error_type, names = expected[r["sample_id"]]
            assert r["error_type"] == error_type, (r["sample_id"], r["error"])
            assert names in r["error"], (r["sample_id"], r["error"])  # the file (or manifest row) is named
            assert r["output_text"] is None and r["num_output_tokens"] is None
    assert_good_rows([r for r in rows if r["sample_id"].startswith("good-")])
    assert "video.max_source_pixels = 6144" in next(r["error"] for r in rows if r["sample_id"] == "huge")


# ---------------------------------------------------------------------------------------------
# 3. Resume, nightly growth, overwrite, a changed config


def test_resume_incremental_overwrite_and_conflict(local_ray, counter_videos, tmp_path):
    rows = counter_rows(counter_videos[:6])
    manifest = write_jsonl(tmp_path / "manifest.jsonl", rows)
    out = str(tmp_path / "out")
    ids = [r["id"] for r in rows]

    # half the samples first
    first = run_job(tiny_config(manifest, out, "input.limit=3"))
    assert (first.rows_written, first.skipped_done) == (6, 0)
    assert_exactly_once(read_results(out), ids[:3])

    # then all of them: only the other half is scheduled
    cfg = tiny_config(manifest, out)
    plan = plan_run(cfg)
    assert (plan.num_pairs_total, plan.num_pairs_done, plan.num_pairs_pending) == (12, 6, 6)
    assert [s.sample_id for s, modes in plan.pending] == ids[3:]
    second = run_job(cfg, plan=plan)
    assert (second.rows_written, second.skipped_done) == (6, 6)
    assert_exactly_once(read_results(out), ids)
    record = run_record(out, second.run_id)["counts"]
    assert (record["pairs_already_done"], record["pairs_scheduled"]) == (6, 6)

    # nothing new: no Parquet written, no file touched
    before = {f: os.stat(f).st_mtime_ns for f in result_files(out)}
    again = run_job(cfg)
    assert (again.rows_written, again.files_written, again.skipped_done) == (0, 0, 12)
    assert {f: os.stat(f).st_mtime_ns for f in result_files(out)} == before
    assert run_record(out, again.run_id)["counts"]["pairs_scheduled"] == 0

    # the nightly manifest gained two videos: only those run
    rows += counter_rows(counter_videos[6:8], start=6)
    write_jsonl(tmp_path / "manifest.jsonl", rows)
    plan = plan_run(cfg)
    assert [s.sample_id for s, _ in plan.pending] == ["s6", "s7"] and plan.num_pairs_done == 12
    nightly = run_job(cfg, plan=plan)
    assert (nightly.rows_written, nightly.skipped_done) == (4, 12)
    assert_exactly_once(read_results(out), [r["id"] for r in rows])

    # sizing and input are not part of the config hash: another batch size resumes the same output
    assert plan_run(tiny_config(manifest, out, "runtime.batch_size=2")).num_pairs_pending == 0

    # a config that changes results refuses the output before any work
    runs_before = sorted(os.listdir(Path(out) / RUNS_DIR))
    files_before = result_files(out)
    with pytest.raises(OutputConflict, match="another config"):
        run_job(tiny_config(manifest, out, "controller.lr=0.5"))
    assert sorted(os.listdir(Path(out) / RUNS_DIR)) == runs_before and result_files(out) == files_before

    # --overwrite starts afresh: results and run records are gone, every pair is pending
    plan = plan_run(tiny_config(manifest, out, "controller.lr=0.5"), overwrite=True)
    assert (plan.num_pairs_done, plan.num_pairs_pending) == (0, 16)
    assert storage.list_files(out, "*") == []  # the refused run released (deleted) its lease too


def test_retry_errors_replaces_each_error_row_in_its_own_file_exactly_once(local_ray, counter_videos, tmp_path):
    late = [str(tmp_path / "late" / f"v{i}.mp4") for i in range(2)]  # uploaded after the first run
    rows = counter_rows([counter_videos[0], late[0], counter_videos[1], late[1]])
    ids = [r["id"] for r in rows]
    cfg = tiny_config(write_jsonl(tmp_path / "m.jsonl", rows), str(tmp_path / "out"))
    out = cfg.output.uri
    first = run_job(cfg)
    assert first.failed_by_type == {"video_not_found": 4}
    files = {f: Path(f).read_bytes() for f in result_files(out)}

    # types not named are not retried; the error rows are found with their files
    assert find_targets(out, parse_types("video_unreadable")).file_of == {}
    targets = find_targets(out, parse_types(None))
    assert set(targets.file_of) == {(s, m) for s in ("s1", "s3") for m in MODES}
    assert set(targets.file_of.values()) <= set(files)

    # a retry run stopped before all of a file's retried rows are back writes nothing for it
    plan = plan_run(cfg, retry=targets)
    assert (plan.num_pairs_pending, plan.retry.num_scheduled_total) == (4, 4)
    table = read_results(out)
    sink = RetrySink(ResultSink(out, ROWS_PER_FILE, "zstd", 60.0, RunResult("x", out)), targets, "zstd")
    f = max(targets.scheduled, key=lambda f: len(targets.scheduled[f]))
    assert len(targets.scheduled[f]) > 1  # (one sample's two modes are written together)
    key = sorted(targets.scheduled[f])[0]
    sink.add(table.filter(pa.compute.and_(pa.compute.equal(table.column("sample_id"), key[0]),
                                          pa.compute.equal(table.column("mode"), key[1]))))
    sink.close()
    assert {f: Path(f).read_bytes() for f in result_files(out)} == files

    # the videos arrive; --retry-errors decodes those rows again and rewrites their files in place
    Path(late[0]).parent.mkdir()
    for src, dst in zip(counter_videos[2:4], late):
        Path(dst).write_bytes(Path(src).read_bytes())
    plan = plan_run(cfg, retry=find_targets(out, parse_types(None)))
    res = run_job(cfg, plan=plan)
    assert (res.rows_retried, res.rows_retry_succeeded, res.rows_failed) == (4, 4, 0)
    assert set(result_files(out)) == set(files)  # same names: each file holds the same keys
    table = read_results(out)
    assert_exactly_once(table, ids)
    assert_good_rows(table.to_pylist())
    record = run_record(out, res.run_id)
    assert record["retry_errors"] == {"types": list(parse_types(None)), "rows_scheduled": 4}
    assert (record["counts"]["rows_retried"], record["counts"]["rows_retry_succeeded"]) == (4, 4)
    assert plan_run(cfg, retry=find_targets(out, parse_types(None))).num_pairs_pending == 0


def test_retry_errors_names_only_known_types():
    assert parse_types("") == parse_types(None) == TRANSIENT_ERROR_TYPES
    assert parse_types("video_unreadable, decode_error") == ("video_unreadable", "decode_error")
    with pytest.raises(ValueError, match="unknown error type"):
        parse_types("video_missing")


# ---------------------------------------------------------------------------------------------
# 4. A model actor dies mid-batch: Ray restarts it and retries the batch


def test_actor_killed_mid_batch_is_retried_exactly_once(local_ray, fault_marker, counter_videos, tmp_path):
    rows = counter_rows(counter_videos[:6])
    out = str(tmp_path / "out")
    cfg = tiny_config(write_jsonl(tmp_path / "manifest.jsonl", rows), out)
    fault_marker.unlink()  # arm: the first model batch os._exit()s its actor
    try:
        res = run_job(cfg)
        assert fault_marker.exists(), "the fault was not injected: no model actor saw FAULT_ENV"
        killed_pid = fault_marker.read_text()
    finally:
        fault_marker.write_text("disarmed")

    assert (res.rows_written, res.rows_failed) == (12, 0)
    table = read_results(out)
    assert_exactly_once(table, [r["id"] for r in rows])
    assert_good_rows(table.to_pylist())
    # the rows came from a restarted actor, not from the one that died
    actors = run_record(out, res.run_id)["actor_metrics"]
    assert actors and all(not a.endswith(f":{killed_pid}") for a in actors), (killed_pid, list(actors))


def test_a_poisoned_device_heals_in_a_fresh_actor(local_ray, device_fault_marker, counter_videos, tmp_path):
    rows = counter_rows(counter_videos[:4])
    out = str(tmp_path / "out")
    cfg = tiny_config(write_jsonl(tmp_path / "manifest.jsonl", rows), out)
    device_fault_marker.unlink()  # arm: the first actor to decode keeps failing with a CUDA error
    try:
        res = run_job(cfg)
        poisoned_pid = device_fault_marker.read_text()
    finally:
        device_fault_marker.write_text("disarmed")

    assert poisoned_pid.isdigit(), "the fault was not injected"
    assert (res.rows_written, res.rows_failed) == (8, 0)  # every row answered, none as an error
    table = read_results(out)
    assert_exactly_once(table, [r["id"] for r in rows])
    assert_good_rows(table.to_pylist())
    actors = run_record(out, res.run_id)["actor_metrics"]
    assert actors and all(not a.endswith(f":{poisoned_pid}") for a in actors), (poisoned_pid, list(actors))


def test_a_sample_that_breaks_every_device_ends_the_run(local_ray, device_fault_marker, counter_videos, tmp_path):
    rows = counter_rows(counter_videos[:2])
    out = str(tmp_path / "out")
    # no retries: each would meet the same poisoned device (bounded retries are what end it; 0 keeps the test short)
    cfg = tiny_config(write_jsonl(tmp_path / "manifest.jsonl", rows), out,
                      "runtime.max_task_retries=0", "runtime.max_pipeline_restarts=0")
    device_fault_marker.write_text("always")
    try:
        with pytest.raises(Exception) as failed:  # bounded by runtime.max_task_retries: no endless loop
            run_job(cfg)
    finally:
        device_fault_marker.write_text("disarmed")
    assert "actor died" in str(failed.value).lower(), str(failed.value)[-2000:]  # the actor left; it wrote nothing
    written = read_results(out) if os.path.isdir(out) and any(Path(out).rglob("*.parquet")) else None
    assert written is None or written.num_rows == 0  # nothing recorded as done


@pytest.mark.parametrize("override, says", [
    ("runtime.num_gpus_per_actor=1", "no node has a GPU"),  # a GPU config run with model.device=cpu
    ("runtime.num_cpus_per_actor=2", "leave none for the video stage"),  # the actor takes both of the 2 CPUs
])
def test_a_run_that_cannot_be_placed_exits_before_any_work(local_ray, counter_videos, tmp_path, override, says):
    from vreason_batch.job.resources import Unschedulable

    out = tmp_path / "out"
    cfg = tiny_config(write_jsonl(tmp_path / "manifest.jsonl", counter_rows(counter_videos[:2])), str(out), override)
    with pytest.raises(Unschedulable, match=says) as e:
        run_job(cfg)
    assert "cannot grow: no autoscaler" in str(e.value) and override.split("=")[0] in str(e.value)
    assert not list(out.rglob("*.parquet")) and not list(out.rglob("_runs/*.json"))  # no work, no run record


# ---------------------------------------------------------------------------------------------
# 5. The driver is killed mid-run; a re-run completes without duplicates


def _kill_session(proc: subprocess.Popen, wait_s: float) -> list[int]:
    """SIGKILL the process group we started and wait for its whole session to end.

    The group holds the driver, gcs_server and raylet; Ray's workers lead process groups of their
    own (same session) and exit by themselves a few seconds after their raylet is gone. Returns the
    session's processes still alive after `wait_s`, which are then killed by pid so nothing leaks.
    """
    sid = proc.pid  # start_new_session=True: the child leads its own session and group
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + wait_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = session_pids(sid)
    kill_pids(survivors)
    return survivors


def test_driver_killed_mid_run_then_resumed(local_ray, counter_videos, tmp_path):
    # 12 samples on 10 videos, about 4 model calls of ~3 samples x 2 modes: several are still to come
    # when the first file lands
    rows = [{"id": f"k{i}", "video": counter_videos[i % len(counter_videos)], "question": f"Frame count? ({i})"}
            for i in range(12)]
    out = tmp_path / "out"
    data = tiny_config_dict(write_jsonl(tmp_path / "manifest.jsonl", rows), str(out))
    data["decoding"] = {**data["decoding"], "max_new_tokens": 12, "stop_strings": []}
    data["output"]["lease_ttl_s"] = 6  # short: the re-run below waits for it to expire
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    log = tmp_path / "driver.log"
    total = len(rows) * len(MODES)

    # the CLI in its own session: it starts (and fate-shares with) its own local Ray
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vreason_batch.cli", "run", str(cfg_path)],
            cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 150
        while not (out.is_dir() and any(out.glob("part-*.parquet"))):
            assert proc.poll() is None, f"the job ended before writing a file:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no part file after 150 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
    finally:
        survivors = _kill_session(proc, wait_s=15)
    assert not survivors, f"processes of the killed run outlived it by 15 s: {survivors}"
    # the log up to the kill holds a whole run's start-up, the model actor's start and its first
    # batches: nothing there may be an error or a warning (see KNOWN_RAY_LINES)
    assert unexpected_noise(log.read_text()) == []

    written = pair_counts(read_results(str(out)))
    assert 0 < sum(written.values()) < total, "the driver should have died mid-run"
    assert max(written.values()) == 1

    # the killed driver's lease is still live: a re-run is refused until it expires, then takes over
    cfg = config_from_dict(data)
    holder = current_holder(str(out))
    assert holder is not None and holder.run_id in log.read_text()
    with pytest.raises(LeaseHeld, match=holder.run_id):
        run_job(cfg)
    time.sleep(max(0.0, holder.expires_at - time.time()) + 0.2)
    assert current_holder(str(out)) is None

    # the re-run (here in-process, on this module's Ray) schedules only what is missing
    plan = plan_run(cfg)
    assert plan.num_pairs_done == sum(written.values())
    assert {(s.sample_id, m) for s, modes in plan.pending for m in modes} == {
        (r["id"], m) for r in rows for m in MODES} - set(written)
    res = run_job(cfg, plan=plan)
    assert (res.rows_written, res.skipped_done) == (total - plan.num_pairs_done, plan.num_pairs_done)
    table = read_results(str(out))
    assert_exactly_once(table, [r["id"] for r in rows])
    assert_good_rows(table.to_pylist())


# ---------------------------------------------------------------------------------------------
# 6. Text-only questions on the VL model


def test_text_only_questions(local_ray, tmp_path):
    rows = [
        {"id": "t0", "question": "What is 2 + 3?", "answer": "5", "problem_type": "numerical"},
        {"id": "t1", "question": "Which is a fruit?", "options": ["apple", "brick"], "answer": "A"},
        {"id": "t2", "question": "Name a colour."},
    ]
    out = str(tmp_path / "out")
    cfg = tiny_config(write_jsonl(tmp_path / "questions.jsonl", rows), out, "input.text_only=true")

    res = run_job(cfg)

    assert (res.rows_written, res.rows_failed) == (6, 0)
    table = read_results(out)
    assert_exactly_once(table, ["t0", "t1", "t2"])
    assert_good_rows(table.to_pylist(), video=False)


# ---------------------------------------------------------------------------------------------
# 7. Work done once per video; the number of decode slots does not change an answer

ANNOTATE_MODES = ("greedy", "vreason", "vreason_lite")
ANNOTATE_QUESTIONS = ["What is shown?", "How many bands are there?", "Which frame is brightest?"]


@pytest.fixture(scope="module")
def annotation_runs(local_ray, tmp_path_factory) -> dict[int, tuple[pa.Table, dict]]:
    """Annotation mode over three videos x three questions x three modes, run with
    runtime.decode_slots 1 and 4: {slots: (the output, the run record)}. Slots 1: batch_size 9, a
    model call holds all three videos (three stage rows), one call at a time (calls_per_actor 1).
    Slots 4: batch_size 3, a call per video, two in flight (the default): their 27 rows share the
    slots across calls."""
    d = tmp_path_factory.mktemp("annotate")
    videos = d / "videos"
    videos.mkdir()
    for i in range(3):
        write_counter_video(videos / f"clip{i}.mp4", num_frames=10 + 2 * i)
    runs = {}
    for slots in (1, 4):
        out = str(d / f"out-slots{slots}")
        data = {**TINY, "input": {"annotate": {"videos": str(videos), "questions": ANNOTATE_QUESTIONS}},
                "output": {"uri": out, "rows_per_file": 100}}
        data["decoding"] = {"modes": list(ANNOTATE_MODES), "max_new_tokens": 6}
        per_call = ["runtime.batch_size=9", "runtime.calls_per_actor=1"] if slots == 1 else ["runtime.batch_size=3"]
        res = run_job(config_from_dict(data, [f"runtime.decode_slots={slots}", *per_call]))
        runs[slots] = (read_results(out), run_record(out, res.run_id))
    return runs


def test_decode_slots_do_not_change_answers(annotation_runs):
    answers = {}
    for slots, (table, _) in annotation_runs.items():
        rows = table.to_pylist()
        assert Counter((r["sample_id"], r["mode"]) for r in rows) == Counter(
            {(s, m): 1 for s in {r["sample_id"] for r in rows} for m in ANNOTATE_MODES}), slots
        assert len(rows) == 27, slots
        assert_good_rows(rows)
        answers[slots] = {(r["sample_id"], r["mode"]): (r["output_text"], r["num_output_tokens"]) for r in rows}
    assert answers[1] == answers[4]


def test_annotation_decodes_each_video_once(annotation_runs):
    for slots, (_, record) in annotation_runs.items():
        counts = record["counts"]
        assert (counts["rows_written"], counts["rows_failed"]) == (27, 0), slots
        assert counts["video_decodes"] == 3, (slots, counts)  # not 9 (questions), not 27 (rows)
        assert counts["prefill_tokens"] > 0 and counts["vision_encodes"] > 0, (slots, counts)


def test_annotation_encodes_each_video_once(annotation_runs):
    counts = annotation_runs[4][1]["counts"]
    assert counts["vision_encodes"] == 3, counts


def test_the_last_progress_line_says_what_was_written(capsys):
    """A periodic line at 100% printed before the last flush must not stand for the run's last line."""
    from types import SimpleNamespace

    from vreason_batch.job.pipeline import _Progress

    result = SimpleNamespace(rows_written=0, files_written=0, rows_failed=0, output_tokens=0)
    sink = SimpleNamespace(result=result, rows_finished=10)
    progress = _Progress(total=10, interval_s=0.0)
    progress.update(sink)  # every row finished, none written yet
    result.rows_written, result.files_written = 10, 1  # the sink's close wrote them
    progress.update(sink, force=True)
    progress.update(sink, force=True)  # nothing new: no line
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "10/10 rows finished (100%), 0 written" in lines[0]
    assert "10/10 rows finished (100%), 10 written in 1 files" in lines[1]
