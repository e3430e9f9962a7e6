"""The distributed job: manifest -> skip done -> video decode (CPU tasks) -> modes -> model actors -> Parquet.

Ray Data does the scheduling, streaming and backpressure; this module builds the dataset from
the stages and drives it. Planning is in `plan`, the stage functions in `stages`, the output
store and run records in `results`.

Exactly-once: the driver is the sink. It pulls result batches of `rows_per_file` rows from the
stream and writes each as one whole object named by its keys (`results.write_shard`). A re-run
first reads the keys already written and only schedules what is missing; a retried write of the
same rows lands on the same key.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .config import Config
from .plan import RunPlan, plan_run
from .results import RunResult, tally, write_run_record, write_shard
from .stages import ModelStage, expand_modes, load_video_row, metrics_collector_class, model_needs_video

MAX_INPUT_BLOCKS = 100_000


def build_dataset(cfg: Config, plan: RunPlan, metrics_actor: Any = None):
    """Wire manifest rows -> video stage -> mode expansion -> model actors (a lazy Ray Dataset)."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    items = [{**s.to_dict(), "modes": modes} for s, modes in plan.pending]
    rt = cfg.runtime
    # one sample per block (up to a cap for huge corpora): an actor task then spans about one
    # batch, and results reach the driver, and so the object store, as each batch finishes.
    # With fewer, larger blocks Ray Data bundles several batches into one task whose output only
    # appears when the whole task ends, so a killed driver would lose all of it.
    n_blocks = max(1, min(len(items), MAX_INPUT_BLOCKS))
    ds = ray.data.from_items(items, override_num_blocks=n_blocks)
    ds = ds.map(
        load_video_row,
        fn_kwargs={"video_cfg": cfg.video.model_dump(), "needs_video": model_needs_video(cfg)},
        num_cpus=1,
        compute=TaskPoolStrategy(size=rt.video_workers),
        # bounded: a sample that kills its worker every time must fail the job (which then
        # resumes), not retry forever. Passed as remote args: Ray 2.60 has no named parameter.
        max_retries=rt.max_task_retries,
    )
    ds = ds.flat_map(expand_modes)
    ds = ds.map_batches(
        ModelStage,
        fn_constructor_kwargs={
            "cfg_json": cfg.model_dump_json(),
            "run_id": plan.run_id,
            "config_hash": plan.config_hash,
            "metrics_actor": metrics_actor,
        },
        batch_size=rt.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=rt.num_actors),
        num_gpus=rt.num_gpus_per_actor or None,
        num_cpus=rt.num_cpus_per_actor,
        max_restarts=rt.max_task_retries,
        max_task_retries=rt.max_task_retries,
    )
    return ds


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (ray job submit sets it), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # "local", not None: None would join whatever cluster the last `ray start` on this machine
        # recorded in /tmp/ray/ray_current_cluster (even a dead one) instead of starting our own.
        ray.init(address="local", num_cpus=num_cpus, log_to_driver=True, include_dashboard=False)


class _Progress:
    def __init__(self, total: int, interval_s: float) -> None:
        self.total, self.interval_s = total, interval_s
        self.t0 = self.t_last = time.perf_counter()
        self.printed = -1

    def update(self, res: RunResult, force: bool = False) -> None:
        now = time.perf_counter()
        if (not force and now - self.t_last < self.interval_s) or (force and self.printed == res.rows_written):
            return
        self.t_last, self.printed = now, res.rows_written
        el = now - self.t0
        done = res.rows_written
        pct = 100.0 * done / self.total if self.total else 100.0
        rate = done / el if el else 0.0
        eta = (self.total - done) / rate if rate else float("nan")
        width = 30
        bar = "#" * int(width * pct / 100) + "-" * (width - int(width * pct / 100))
        print(
            f"[vreason-batch] [{bar}] {done}/{self.total} rows ({pct:.0f}%) failed={res.rows_failed} "
            f"files={res.files_written} out_tok/s={res.output_tokens / el if el else 0:.1f} "
            f"elapsed={el:.0f}s eta={eta:.0f}s",
            flush=True,
        )


def run_job(cfg: Config, overwrite: bool = False, plan: RunPlan | None = None) -> RunResult:
    """Plan, run on Ray, write Parquet + the run record. Safe to re-run: skips what is written."""
    import ray

    plan = plan or plan_run(cfg, overwrite=overwrite)
    result = RunResult(run_id=plan.run_id, output_uri=cfg.output.uri, skipped_done=plan.num_pairs_done)
    print(
        f"[vreason-batch] run {plan.run_id}: {plan.manifest_summary}; {plan.num_pairs_done} of "
        f"{plan.num_pairs_total} (sample, mode) rows already in {cfg.output.uri}; {plan.num_pairs_pending} to do",
        flush=True,
    )
    write_run_record(cfg, plan, "running")
    t0 = time.perf_counter()
    if plan.num_pairs_pending == 0:
        result.wall_s = time.perf_counter() - t0
        write_run_record(cfg, plan, "finished", result)
        return result

    init_ray()
    metrics = metrics_collector_class().remote()
    ds = build_dataset(cfg, plan, metrics)
    progress = _Progress(plan.num_pairs_pending, cfg.runtime.progress_interval_s)
    try:
        for table in ds.iter_batches(batch_size=cfg.output.rows_per_file, batch_format="pyarrow", prefetch_batches=1):
            write_shard(cfg.output.uri, table, cfg.output.compression)
            tally(result, table)
            progress.update(result)
    except BaseException as e:
        result.wall_s = time.perf_counter() - t0
        write_run_record(cfg, plan, "failed", result, {"error": f"{type(e).__name__}: {e}"})
        raise
    result.wall_s = time.perf_counter() - t0
    progress.update(result, force=True)
    actor_metrics = ray.get(metrics.get.remote())
    write_run_record(cfg, plan, "finished", result, {"actor_metrics": actor_metrics})
    return result
