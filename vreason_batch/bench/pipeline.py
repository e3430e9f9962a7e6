"""`vreason-batch bench --workload pipeline`: what the job costs per row outside the model.

Every manifest row names a video that does not exist, so each becomes an error row without any
model work; what is left is the pipeline itself (planning, Ray Data's scheduling, the video and
model stages passing rows through, the sink). Two runs of different sizes on one local Ray: the
difference divided by the difference in rows is the marginal cost per row, with Ray's start-up,
the model actors' start-up and the run's fixed costs cancelled out. The driver's CPU is this
process's own (all its threads; Ray's raylet, GCS and workers are other processes).

`--workload plan` measures planning alone at corpus scale: `run --dry-run` in a child process
(wall time and peak resident memory) over a generated manifest of `--plan-rows` rows of which
`--plan-done` (sample, mode) rows are already written; the files are deleted afterwards.

Figures, not a test. On a shared machine repeat (`--repeats`) and read the spread.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time
from typing import Any


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def write_missing_video_manifest(path: str, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"m{i:08d}", "video": f"/nonexistent/vreason-bench/{i}.mp4", "question": "q?"}) + "\n")


def _one_run(workdir: str, n: int, modes: list[str], overrides: list[str]) -> dict[str, float]:
    from vreason_batch.config import config_from_dict
    from vreason_batch.job.pipeline import run_job

    tag = f"{n}-{time.monotonic_ns()}"
    manifest = os.path.join(workdir, f"manifest-{tag}.jsonl")
    write_missing_video_manifest(manifest, n)
    cfg = config_from_dict(
        {
            "input": {"manifest": manifest},
            "output": {"uri": os.path.join(workdir, f"out-{tag}")},
            "decoding": {"modes": modes, "max_new_tokens": 4},
        },
        overrides,
    )
    cpu0, t0 = _cpu_s(), time.perf_counter()
    res = run_job(cfg)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    if res.rows_written != n * len(modes) or res.rows_failed != res.rows_written:
        raise RuntimeError(f"expected {n * len(modes)} error rows, got {res.rows_written} ({res.rows_failed} failed)")
    return {"rows": n, "wall_s": wall, "driver_cpu_s": cpu, "files": res.files_written}


def run_pipeline_bench(args) -> dict[str, Any]:
    from vreason_batch.job.pipeline import init_ray

    small, large = sorted(int(x) for x in args.rows.split(","))
    modes = ["greedy", "vreason"]
    init_ray()
    runs, marginal = [], []
    with tempfile.TemporaryDirectory(prefix="vreason-bench-pipeline-") as workdir:
        _one_run(workdir, 20, modes, args.set)  # warm-up: imports, first actor start, caches
        for rep in range(args.repeats):
            a = _one_run(workdir, small, modes, args.set)
            b = _one_run(workdir, large, modes, args.set)
            runs += [a, b]
            d = large - small
            m = {
                "driver_cpu_ms_per_row": 1e3 * (b["driver_cpu_s"] - a["driver_cpu_s"]) / d,
                "wall_ms_per_row": 1e3 * (b["wall_s"] - a["wall_s"]) / d,
            }
            marginal.append(m)
            print(
                f"[bench pipeline] repeat {rep + 1}: {small} rows {a['wall_s']:.1f}s wall {a['driver_cpu_s']:.1f}s "
                f"driver CPU; {large} rows {b['wall_s']:.1f}s wall {b['driver_cpu_s']:.1f}s driver CPU; marginal "
                f"{m['driver_cpu_ms_per_row']:.2f} ms driver CPU and {m['wall_ms_per_row']:.2f} ms wall per manifest row",
                flush=True,
            )
    figures = {
        "workload": "pipeline",
        "rows": [small, large],
        "modes": modes,
        "overrides": args.set,
        "cpus": os.cpu_count(),
        "runs": runs,
        "marginal": marginal,
        "driver_cpu_ms_per_row_median": statistics.median(m["driver_cpu_ms_per_row"] for m in marginal),
        "wall_ms_per_row_median": statistics.median(m["wall_ms_per_row"] for m in marginal),
    }
    print(
        f"[bench pipeline] per manifest row ({len(modes)} output rows each), median of {args.repeats}: "
        f"driver CPU {figures['driver_cpu_ms_per_row_median']:.2f} ms (goal <= 1), "
        f"wall {figures['wall_ms_per_row_median']:.2f} ms (goal <= 2)",
        flush=True,
    )
    return figures


def _write_plan_corpus(workdir: str, n_rows: int, n_done: int, modes: list[str]) -> str:
    """A manifest of n_rows samples (16-hex ids, relative videos, 4 options), n_done rows already
    written (the first samples, every mode, files of 256 rows); returns the job config path."""
    import pyarrow as pa
    import yaml

    from vreason_batch.config import config_from_dict
    from vreason_batch.job.results import write_shard
    from vreason_batch.io.schema import OUTPUT_SCHEMA, SCHEMA_VERSION

    manifest = os.path.join(workdir, "corpus.jsonl")
    with open(manifest, "w") as f:
        for start in range(0, n_rows, 100_000):
            f.write("".join(
                f'{{"id": "{i:016x}", "video": "videos/{i % 997}/clip{i}.mp4", "question": "What happens first in clip {i}?", '
                f'"options": ["A. it jumps", "B. it runs", "C. it sits", "D. it flies"], "answer": "B"}}\n'
                for i in range(start, min(n_rows, start + 100_000))
            ))
    data = {"input": {"manifest": manifest}, "output": {"uri": os.path.join(workdir, "out")},
            "decoding": {"modes": modes}}
    cfg = config_from_dict(data)
    per_file = 256
    ids = [f"{i:016x}" for i in range(-(-n_done // len(modes)))]
    keys = [(s, m) for s in ids for m in modes][:n_done]
    for start in range(0, len(keys), per_file):
        chunk = keys[start:start + per_file]
        cols = {name: pa.nulls(len(chunk), OUTPUT_SCHEMA.field(name).type) for name in OUTPUT_SCHEMA.names}
        cols.update(
            schema_version=pa.array([SCHEMA_VERSION] * len(chunk), pa.int16()),
            run_id=pa.array(["bench"] * len(chunk)), config_hash=pa.array([cfg.config_hash()] * len(chunk)),
            model=pa.array([cfg.model.name_or_path] * len(chunk)),
            sample_id=pa.array([k[0] for k in chunk]), mode=pa.array([k[1] for k in chunk]),
        )
        write_shard(cfg.output.uri, pa.table(cols, schema=OUTPUT_SCHEMA), "zstd")
    path = os.path.join(workdir, "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def run_plan_bench(args) -> dict[str, Any]:
    import subprocess
    import sys

    modes = ["greedy", "vreason"]
    with tempfile.TemporaryDirectory(prefix="vreason-bench-plan-", dir="/tmp") as workdir:
        t0 = time.perf_counter()
        cfg_path = _write_plan_corpus(workdir, args.plan_rows, args.plan_done, modes)
        print(f"[bench plan] corpus written in {time.perf_counter() - t0:.0f}s "
              f"({os.path.getsize(os.path.join(workdir, 'corpus.jsonl')) / 2**30:.2f} GiB manifest)", flush=True)
        runs = []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "vreason_batch.cli", "run", cfg_path, "--dry-run"],
                                    stdout=subprocess.PIPE, text=True)
            out = proc.stdout.read()
            _, status, ru = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            if status != 0:
                raise RuntimeError(f"run --dry-run failed ({status}): {out[-2000:]}")
            plan = json.loads(out)
            runs.append({"wall_s": wall, "peak_rss_mib": ru.ru_maxrss / 1024, "cpu_s": ru.ru_utime + ru.ru_stime})
            print(f"[bench plan] repeat {rep + 1}: {args.plan_rows} rows, {args.plan_done} done: run --dry-run "
                  f"{wall:.1f}s wall, {runs[-1]['cpu_s']:.1f}s CPU, peak RSS {runs[-1]['peak_rss_mib']:.0f} MiB; "
                  f"plan: {plan['pairs_done']} done, {plan['pairs_pending']} pending", flush=True)
    return {"workload": "plan", "rows": args.plan_rows, "done": args.plan_done, "runs": runs, "cpus": os.cpu_count()}
