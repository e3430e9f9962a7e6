"""The distributed job: manifest -> skip done -> video decode, once a video (CPU tasks) -> model actors -> Parquet.

Ray Data does the scheduling, streaming and backpressure; this module builds the dataset from
the stages and drives it. Planning is in `plan`, the stages in `stages` (`stages.video`, the
video tasks; `stages.model`, the model actors), the output store and run records in `results`,
the collector of the actors' metrics in `metrics`.

Exactly-once: the driver is the sink. It takes result blocks from the stream as they arrive and
writes whole objects named by their keys (`results.ResultSink`: every `rows_per_file` rows, or
`flush_interval_s` after a row arrived). A re-run first reads the keys already written and only
schedules what is missing; a retried write of the same rows lands on the same key. One run per
output at a time: the driver holds a lease on the output (`lease`) while it plans and writes.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from vreason_batch.config import Config
from vreason_batch.job.lease import Lease, LeaseLost
from vreason_batch.job.metrics import metrics_collector_class
from vreason_batch.job.plan import RunPlan, input_blocks, new_run_id, plan_run
from vreason_batch.job.resources import WaitingNotice, check_schedulable
from vreason_batch.job.results import ResultSink, RunResult, write_run_record
from vreason_batch.job.retry import RetrySink
from vreason_batch.job.stages import ModelStage, model_batch_rows, model_needs_video, video_stage

log = logging.getLogger(__name__)

MAX_INPUT_BLOCKS = 100_000
BLOCKS_PER_ACTOR = 8  # small runs: at least this many input blocks per model actor, for balance
# Ray Data cuts a task's output into blocks of about this size. Small, so that a row with frames
# (~1-30 MB) travels alone and reaches a model actor as soon as it is decoded, while rows without
# frames (errors, text) travel in bulk: Ray's cost on the driver is per block, not per row.
STAGE_BLOCK_BYTES = 1 << 20
ACTOR_EXIT_TIMEOUT_S = 60.0  # most time to wait for a finished pipeline's model actors to be dead


def samples_per_block(cfg: Config, num_samples: int) -> int:
    """Samples in one input block (one video task).

    Ray Data's driver-side cost is per block and per task, so blocks hold many samples; but a
    model actor's task spans its input block, so a small run gets smaller blocks to give every
    actor several, and no block exceeds runtime.max_samples_per_block (unless MAX_INPUT_BLOCKS would).
    """
    rt = cfg.runtime
    by_balance = -(-num_samples // (BLOCKS_PER_ACTOR * rt.actor_pool[1]))
    by_cap = -(-num_samples // MAX_INPUT_BLOCKS)
    return max(1, by_cap, min(rt.max_samples_per_block, by_balance))


def build_dataset(cfg: Config, plan: RunPlan, metrics_actor: Any = None):
    """Wire pending samples -> video stage -> model actors (a lazy Ray Dataset).

    The input is the plan's Arrow tables cut into blocks of about `samples_per_block` samples,
    where a video starts: no Python object per sample on the driver, a few Ray blocks and tasks
    per many samples, and each video in one video task.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    rt = cfg.runtime
    k = samples_per_block(cfg, plan.num_samples_pending)
    blocks = input_blocks(plan, k)  # cut where a video starts: each video's samples in one block
    # A Dataset seals the current DataContext when it is created: set the block size for ours only.
    ctx = DataContext.get_current()
    saved_block_bytes = ctx.target_max_block_size
    ctx.target_max_block_size = STAGE_BLOCK_BYTES
    try:
        ds = ray.data.from_arrow(blocks)
        ds = ds.map_batches(
            video_stage,
            fn_kwargs={"video_cfg": cfg.video.model_dump(), "needs_video": model_needs_video(cfg),
                       "max_samples_per_row": rt.batch_size},
            batch_size=None,  # the whole block: video_stage decides what travels together
            batch_format="pyarrow",
            num_cpus=1,
            compute=TaskPoolStrategy(size=rt.video_workers),
            # bounded: a sample that kills its worker every time must fail the job (which then
            # resumes), not retry forever. Passed as remote args: Ray 2.60 has no named parameter.
            max_retries=rt.max_task_retries,
        )
        ds = ds.map_batches(
            ModelStage,
            fn_constructor_kwargs={
                "cfg_json": cfg.model_dump_json(),
                "run_id": plan.run_id,
                "config_hash": plan.config_hash,
                "metrics_actor": metrics_actor,
            },
            batch_size=model_batch_rows(cfg, plan.num_samples_pending, plan.num_videos_pending),
            batch_format="pyarrow",
            compute=_actor_pool(rt),
            num_gpus=rt.num_gpus_per_actor or None,
            num_cpus=rt.num_cpus_per_actor,
            max_restarts=rt.max_task_retries,
            max_task_retries=rt.max_task_retries,
        )
    finally:
        ctx.target_max_block_size = saved_block_bytes
    return ds


def _actor_pool(rt):
    """Ray Data's actor pool: a fixed size, or one that autoscales between [min, max]; each actor runs
    runtime.calls_per_actor calls at once, in threads, fed to its one engine (stages/feeding.py)."""
    from ray.data import ActorPoolStrategy

    lo, hi = rt.actor_pool
    size = {"size": lo} if lo == hi else {"min_size": lo, "max_size": hi}
    n = rt.calls_per_actor
    return ActorPoolStrategy(**size, max_concurrent_calls_per_actor=n, enable_true_multi_threading=n > 1)


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
        self.printed: tuple[int, int] | None = None  # (finished, written) on the last line printed

    def update(self, sink: ResultSink, force: bool = False) -> None:
        """A progress line counting rows finished (received from the model actors) and written."""
        res, done = sink.result, sink.rows_finished
        now = time.perf_counter()
        # forced (the run's last line): unless the last line printed says the same, written rows included
        if (not force and now - self.t_last < self.interval_s) or (force and self.printed == (done, res.rows_written)):
            return
        self.t_last, self.printed = now, (done, res.rows_written)
        el = now - self.t0
        pct = 100.0 * done / self.total if self.total else 100.0
        rate = done / el if el else 0.0
        eta = (self.total - done) / rate if rate else float("nan")
        width = 30
        bar = "#" * int(width * pct / 100) + "-" * (width - int(width * pct / 100))
        print(
            f"[vreason-batch] [{bar}] {done}/{self.total} rows finished ({pct:.0f}%), {res.rows_written} written "
            f"in {res.files_written} files, failed={res.rows_failed} out_tok/s={res.output_tokens / el if el else 0:.1f} "
            f"elapsed={el:.0f}s eta={eta:.0f}s",
            flush=True,
        )


def probe_manifest(cfg: Config) -> None:
    """Read the input's first rows (one id chunk, `manifest.ID_CHUNK`) and raise ManifestError if it
    is missing, unreadable, or small and without usable rows: before a run takes the output's
    lease, so bad input leaves nothing behind. Planning, under the lease, reads the whole input
    once and finds the rest (e.g. a column missing from every row of a large JSONL)."""
    from vreason_batch.io.manifest import ManifestReader

    next(iter(ManifestReader(cfg.input)), None)


def take_lease(cfg: Config, run_id: str) -> Lease:
    """This run's lease on the output (raises LeaseHeld naming a live holder); renewed until released."""
    lease = Lease(cfg.output.uri, run_id, cfg.output.lease_ttl_s).acquire()
    lease.start_renewing()
    return lease


def run_job(cfg: Config, overwrite: bool = False, plan: RunPlan | None = None, lease: Lease | None = None) -> RunResult:
    """Take the output's lease, plan, run on Ray, write Parquet + the run record. Safe to re-run.

    Without `plan`, the lease is taken before planning, so no other run writes between reading
    what is done and doing the rest; `vreason-batch run` does the same and passes both in.
    Raises LeaseHeld (before any cluster work) when another live run holds the output.
    """
    own_lease = lease is None
    if own_lease:
        if plan is None:
            probe_manifest(cfg)
        lease = take_lease(cfg, plan.run_id if plan else new_run_id())
    try:
        plan = plan or plan_run(cfg, overwrite=overwrite, run_id=lease.run_id)
        return _run(cfg, plan, lease)
    finally:
        if own_lease:
            lease.release()


def _run(cfg: Config, plan: RunPlan, lease: Lease) -> RunResult:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    result = RunResult(run_id=plan.run_id, output_uri=cfg.output.uri, skipped_done=plan.num_pairs_done)
    print(
        f"[vreason-batch] run {plan.run_id}: {plan.manifest_summary}; {plan.num_pairs_done} of "
        f"{plan.num_pairs_total} (sample, mode) rows already in {cfg.output.uri}; {plan.num_pairs_pending} to do",
        flush=True,
    )
    missing = _place(cfg, plan)
    write_run_record(cfg, plan, "running")
    t0 = time.perf_counter()
    if plan.num_pairs_pending == 0:
        result.wall_s = time.perf_counter() - t0
        write_run_record(cfg, plan, "finished", result)
        return result

    # on the driver's node: a node lost mid-run must not take the run's metrics with it
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    metrics = metrics_collector_class().options(scheduling_strategy=here).remote()
    sink = _sink(cfg, plan, result, lease)
    progress = _Progress(plan.num_pairs_pending, cfg.runtime.progress_interval_s)
    restarts: list[str] = []
    try:
        todo = plan
        while todo.num_pairs_pending:
            may_restart = len(restarts) < cfg.runtime.max_pipeline_restarts
            try:
                with WaitingNotice(cfg, missing, cfg.runtime.progress_interval_s):
                    lost = _drain(build_dataset(cfg, todo, metrics), sink, progress, may_restart)
            finally:
                _end_model_actors(metrics)
            if lost is None:
                break
            # Ray's own retries are spent (e.g. a node lost while its actor restarts elsewhere):
            # keep what finished, ask the output what is still missing, and run that.
            restarts.append(lost)
            log.warning("pipeline failed (%s); restart %d of %d on what is still missing",
                        lost, len(restarts), cfg.runtime.max_pipeline_restarts)
            sink.flush()
            todo = plan_run(cfg, run_id=plan.run_id, retry=plan.retry)
        sink.close()
    except BaseException as e:
        try:
            sink.close(write=not isinstance(e, LeaseLost))  # the rows that did finish are kept
        except Exception as close_err:  # noqa: BLE001 - the first error is the one to raise
            log.warning("writing the rows finished before the failure: %s", close_err)
        result.wall_s = time.perf_counter() - t0
        write_run_record(cfg, plan, "failed", result, {"error": f"{type(e).__name__}: {e}", "pipeline_restarts": restarts})
        raise
    result.wall_s = time.perf_counter() - t0
    progress.update(sink, force=True)
    actor_metrics = ray.get(metrics.get.remote())
    write_run_record(cfg, plan, "finished", result, {"actor_metrics": actor_metrics, "pipeline_restarts": restarts})
    return result


def _sink(cfg: Config, plan: RunPlan, result: RunResult, lease: Lease):
    """The run's writer; lease.check before every write: a run whose lease was taken over must not write."""
    out = cfg.output
    sink = ResultSink(out.uri, out.rows_per_file, out.compression, out.flush_interval_s, result, before_write=lease.check,
                      partition_by=out.partition_by)
    if plan.retry is not None:  # retried rows go back into their own files, not into new ones
        return RetrySink(sink, plan.retry, out.compression)
    return sink


def _place(cfg: Config, plan: RunPlan) -> str | None:
    """Start Ray for a run with work to do, and check that its stages can be placed: Unschedulable
    (before any work) when they cannot and the cluster cannot grow; what is missing when it may."""
    if not plan.num_pairs_pending:
        return None
    init_ray()
    return check_schedulable(cfg)


def _drain(ds, sink: ResultSink, progress: _Progress, may_restart: bool) -> str | None:
    """Stream the dataset's result blocks into the sink. Returns None when the stream is done, or
    the lost-work error that ended it when the caller may restart (else that error is raised).

    The error is returned as text, not kept: its traceback holds the aborted executor (and with
    it block refs and actor handles), which must be freed before the next pipeline starts.
    """
    try:
        # batch_size=None: each block as it arrives; the sink groups rows into files
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            sink.add(table)
            progress.update(sink)
    except _lost_cluster_work() as e:
        if not may_restart:
            raise
        return f"{type(e).__name__}: {str(e)[:300]}"
    return None


def _end_model_actors(metrics: Any, timeout_s: float = ACTOR_EXIT_TIMEOUT_S) -> None:
    """Kill the model actors of a pipeline that is over, and wait until Ray reports them dead.

    Ray Data only drops its handles to them, and that is not enough after a lost node: Ray still
    counts the lost node's actor alive until it detects the node's death (seconds after the
    pipeline failed), then restarts it (max_restarts) on a surviving node, where it holds its
    CPUs/GPUs while the next pipeline's actor and video tasks wait for them. On a cluster with
    no room for both, that was seen to stall the next pipeline for half a minute and, in one run,
    for good. Killed with no_restart, such an actor is dead for Ray at once and never restarted.
    """
    import gc

    import ray
    from ray.exceptions import ActorDiedError, GetTimeoutError

    t0 = time.monotonic()
    deadline = t0 + timeout_s
    # An aborted Ray Data executor sits in reference cycles (exception -> traceback -> frames);
    # collect them so its block refs and any actor it had not yet handed over are released now.
    gc.collect()
    try:
        handles = ray.get(metrics.take_actors.remote(), timeout=timeout_s)
    except ray.exceptions.RayError as e:  # logged, not raised: it must not hide the error that ended the pipeline
        log.warning("could not list the model actors to end them (%s); the next pipeline may wait for their resources", e)
        return
    for h in handles:
        ray.kill(h, no_restart=True)
    for h in handles:
        while True:
            try:
                ray.get(h.__ray_ready__.remote(), timeout=max(0.0, deadline - time.monotonic()))
            except ActorDiedError:
                break
            except GetTimeoutError:
                log.warning("model actor %s still not dead %.0f s after ray.kill; the next pipeline may wait for "
                            "its resources", h, timeout_s)
                return
            except ray.exceptions.RayActorError:
                pass  # unavailable (its node is going away): not yet known dead, ask again
            if time.monotonic() > deadline:
                log.warning("model actor %s still answering %.0f s after ray.kill", h, timeout_s)
                return
            time.sleep(0.1)
    if handles:
        log.info("ended %d model actor(s) in %.1f s", len(handles), time.monotonic() - t0)


def _lost_cluster_work():
    """Errors that mean work was lost with a process or node, not that a sample is bad."""
    import ray.exceptions as rx

    return (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError)
