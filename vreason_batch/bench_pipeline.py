"""`vreason-batch bench --workload pipeline`: what the job costs per row outside the model.

Every manifest row names a video that does not exist, so each becomes an error row without any
model work; what is left is the pipeline itself (planning, Ray Data's scheduling, the video and
model stages passing rows through, the sink). Two runs of different sizes on one local Ray: the
difference divided by the difference in rows is the marginal cost per row, with Ray's start-up,
the model actors' start-up and the run's fixed costs cancelled out. The driver's CPU is this
process's own (all its threads; Ray's raylet, GCS and workers are other processes).

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
    from .config import config_from_dict
    from .pipeline import run_job

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
    from .pipeline import init_ray

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
