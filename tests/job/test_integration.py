"""`ray start --head` + `ray job submit`: the job entrypoint on a real one-node cluster, the way
the KubeRay RayJob runs it. The head and everything under it are killed by process id at the end."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from procs import kill_pids, proc_table
from videos import write_counter_video

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MODES = ("greedy", "vreason")
# Not uploaded with --working-dir (besides what .gitignore already keeps out).
UPLOAD_EXCLUDES = [".git", ".venv", "runs", ".pytest_cache", "*.egg-info", "__pycache__"]


def ray_cli() -> str:
    """The `ray` next to this interpreter (CI runs .venv/bin/python without the venv on PATH), else on PATH."""
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if found is None:
        pytest.skip("the `ray` CLI is not installed (next to this Python or on PATH)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_and_session(root: int) -> set[int]:
    """`root`, its live descendants, and the live members of its session (jobs run in sessions of their own)."""
    table = proc_table()
    found = {root} | {pid for pid, (_, sid, _) in table.items() if sid == root}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return {pid for pid in found if pid in table and table[pid][2] != "Z"}


def kill_tree(proc: subprocess.Popen, wait_s: float = 15.0) -> set[int]:
    """SIGKILL what `ray start --block` started, by pid; returns those still alive after `wait_s`."""
    pids = tree_and_session(proc.pid)
    kill_pids(pids)
    proc.wait()
    deadline = time.monotonic() + wait_s
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        table = proc_table()
        alive = {p for p in pids if p in table and table[p][2] != "Z"}
    return alive


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster with the job server on free localhost ports; yields (dashboard URL, env)."""
    ray = ray_cli()
    try:
        import aiohttp  # noqa: F401 - the job server is part of the dashboard: ray[default]
    except ImportError:
        pytest.skip("`ray job submit` needs Ray's dashboard / job server: pip install 'ray[default]'")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # A short temp dir of our own: Ray's socket paths must fit in 107 characters, and the
    # ray_current_cluster file `ray start` writes stays out of /tmp/ray, where it would make later
    # ray.init() calls on this machine join this (soon dead) cluster.
    temp_dir = tempfile.mkdtemp(prefix="vrh-", dir="/tmp")
    port, dash_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("head") / "ray-start.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--disable-usage-stats",
             f"--temp-dir={temp_dir}", "--block"],
            env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"ray start exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no job server at {address} after 120 s:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        yield address, env
    finally:
        survivors = kill_tree(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"Ray processes outlived the kill: {sorted(survivors)}"


# The head's job server answers before its node's agent has registered with it; on a loaded
# machine that takes a while, and the submission is refused with this (the job is not created).
NO_AGENT_YET = "No available agent to submit job"


def submit(ray_head, submission_id: str, *job_args: str) -> subprocess.CompletedProcess:
    address, env = ray_head
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(
            [ray_cli(), "job", "submit", "--address", address, "--submission-id", submission_id,
             "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}),
             "--", sys.executable, "jobs/vreason_job.py", *job_args],
            env=env, capture_output=True, text=True, timeout=300,
        )
        if NO_AGENT_YET not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def job_status(ray_head, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient  # an HTTP client: no Ray in this process

    return str(JobSubmissionClient(ray_head[0]).get_job_status(submission_id).value)


def job_logs(ray_head, submission_id: str) -> str:
    address, env = ray_head
    done = subprocess.run([ray_cli(), "job", "logs", submission_id, "--address", address], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture
def job_config(tmp_path) -> tuple[Path, Path]:
    """A tiny job over three synthetic videos; returns (config path, output dir)."""
    rows = [{"id": f"j{i}", "video": str(write_counter_video(tmp_path / f"v{i}.mp4", num_frames=10 + i)),
             "question": f"What changes over time? ({i})"} for i in range(3)]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    config = {
        "name": "integration",
        "input": {"manifest": str(manifest)},
        "output": {"uri": str(out), "rows_per_file": 4},
        "model": {"name_or_path": "builtin:tiny-qwen2.5-vl"},
        "decoding": {"modes": ["greedy"], "max_new_tokens": 6},  # widened to both modes by --set below
        "video": {"num_frames": 4, "min_pixels": 3136, "max_pixels": 12544},
        "runtime": {"batch_size": 4},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, out


def test_job_submit_runs_to_success(ray_head, job_config):
    cfg_path, out = job_config
    sid = f"vreason-test-{uuid.uuid4().hex[:8]}"

    done = submit(ray_head, sid, str(cfg_path), "--set", f"decoding.modes=[{', '.join(MODES)}]",
                  "--set", "runtime.progress_interval_s=1")

    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert job_status(ray_head, sid) == "SUCCEEDED"
    logs = job_logs(ray_head, sid)
    assert "[vreason-batch] run " in logs and "[vreason-batch] done:" in logs, logs[-3000:]
    assert "6 rows in 2 files" in logs and ", 0 failed" in logs, logs[-3000:]

    table = pads.dataset(str(out), format="parquet").to_table()
    counts = Counter(zip(table.column("sample_id").to_pylist(), table.column("mode").to_pylist()))
    assert counts == Counter({(f"j{i}", m): 1 for i in range(3) for m in MODES})
    assert table.column("error_type").null_count == len(table)
    assert min(table.column("num_video_tokens").to_pylist()) > 0
    records = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    assert [(r["status"], r["config"]["name"]) for r in records] == [("finished", "integration")]


def test_job_with_invalid_config_fails_fast(ray_head, job_config):
    cfg_path, out = job_config
    sid = f"vreason-test-{uuid.uuid4().hex[:8]}"

    done = submit(ray_head, sid, str(cfg_path), "--set", "controller.lr=-1")

    assert done.returncode != 0
    assert job_status(ray_head, sid) == "FAILED"
    logs = job_logs(ray_head, sid)
    assert "invalid config" in logs and "controller.lr" in logs, logs[-3000:]
    assert not out.exists(), "the job wrote output before validating its config"
