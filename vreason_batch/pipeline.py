"""The distributed job: manifest -> skip done -> video decode (CPU tasks) -> modes -> model actors -> Parquet.

Ray Data does the scheduling, streaming and backpressure; this module declares the stages.

Exactly-once: the output is a set of whole Parquet objects, each named by a hash of the
(sample_id, mode) keys it holds. The driver is the sink: it pulls result batches of
`rows_per_file` rows from the stream and writes each as one object (local: temp file + rename;
S3: one PUT), so no reader ever sees half a file. A re-run first reads the keys already written
and only schedules what is missing; a retried write of the same rows lands on the same key.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import __version__
from .config import Config, ConfigError
from .schema import OUTPUT_COLUMNS, OUTPUT_SCHEMA, SCHEMA_VERSION, Sample, empty_row, rows_to_table

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"  # run records; the leading underscore makes dataset readers skip them
FAULT_ENV = "VREASON_BATCH_FAULT_ONCE"  # tests: path of a marker; a model actor dies once
MAX_INPUT_BLOCKS = 100_000


class OutputConflict(ConfigError):
    """The output location holds results of a different config."""


@dataclass
class RunPlan:
    run_id: str
    config_hash: str
    pending: list[tuple[Sample, list[str]]]  # sample -> modes still to do
    num_samples: int
    num_pairs_total: int
    num_pairs_done: int
    manifest_summary: str
    duplicates_in_output: int = 0

    @property
    def num_pairs_pending(self) -> int:
        return sum(len(m) for _, m in self.pending)


@dataclass
class RunResult:
    run_id: str
    output_uri: str
    rows_written: int = 0
    rows_failed: int = 0
    files_written: int = 0
    skipped_done: int = 0
    output_tokens: int = 0
    per_mode: dict[str, dict[str, int]] = field(default_factory=dict)
    failed_by_type: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


# ---------------------------------------------------------------------------------------------
# Planning (driver, before any cluster work)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def list_result_files(uri: str) -> list[str]:
    """Committed result objects under `uri` (not run records, not temp files)."""
    from . import storage

    if not storage.exists(uri):
        return []
    out = []
    for f in storage.list_files(uri, "*.parquet"):
        rel = f[len(uri.rstrip("/")) + 1:]
        if any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        out.append(f)
    return sorted(out)


def read_done_keys(uri: str) -> tuple[dict[tuple[str, str], str], int]:
    """{(sample_id, mode): config_hash} already written, and how many keys appear more than once."""
    import pyarrow.parquet as pq

    from . import storage

    done: dict[tuple[str, str], str] = {}
    dupes = 0
    for f in list_result_files(uri):
        fs, path = storage.pyarrow_fs(f)
        t = storage.retry(lambda: pq.read_table(path, filesystem=fs, columns=["sample_id", "mode", "config_hash"]), what=f)
        for sid, mode, h in zip(*(t.column(c).to_pylist() for c in ("sample_id", "mode", "config_hash"))):
            if (sid, mode) in done:
                dupes += 1
            done[(sid, mode)] = h
    return done, dupes


def clear_output(uri: str) -> int:
    """--overwrite: delete this job's result objects and run records (nothing else under uri)."""
    from . import storage

    removed = 0
    for f in list_result_files(uri):
        storage.delete_prefix(f)
        removed += 1
    runs = storage.join(uri, RUNS_DIR)
    if storage.exists(runs):
        removed += storage.delete_prefix(runs)
    return removed


def plan_run(cfg: Config, overwrite: bool = False, dry_run: bool = False) -> RunPlan:
    """Read the manifest, look at what is already written, and list what is left to do.

    With `overwrite`, the job's results are deleted first; with `dry_run` too, nothing is deleted
    and the plan shows what an overwriting run would do.
    """
    from .manifest import read_samples

    manifest = read_samples(cfg.input)
    chash = cfg.config_hash()
    if overwrite and not dry_run:
        clear_output(cfg.output.uri)
    done, dupes = ({}, 0) if overwrite else read_done_keys(cfg.output.uri)
    others = {h for h in done.values() if h != chash}
    if others:
        raise OutputConflict(
            f"{cfg.output.uri} already holds results of another config (hash {sorted(others)[0]}; this one is "
            f"{chash}). Use --overwrite to replace them, or another output.uri."
        )
    pending = []
    n_done = 0
    for s in manifest.samples:
        todo = [m for m in cfg.decoding.modes if (s.sample_id, m) not in done]
        n_done += len(cfg.decoding.modes) - len(todo)
        if todo:
            pending.append((s, todo))
    return RunPlan(
        run_id=new_run_id(),
        config_hash=chash,
        pending=pending,
        num_samples=len(manifest.samples),
        num_pairs_total=len(manifest.samples) * len(cfg.decoding.modes),
        num_pairs_done=n_done,
        manifest_summary=manifest.summary(),
        duplicates_in_output=dupes,
    )


# ---------------------------------------------------------------------------------------------
# Stages (run in Ray workers; plain functions and one class, testable without Ray)


def load_video_row(row: dict[str, Any], video_cfg: dict, needs_video: bool) -> dict[str, Any]:
    """One sample row -> the same row plus sampled, resized frames (or an error). CPU-only."""
    import torch

    from .config import VideoConfig
    from .prompting import resize_frames, smart_resize
    from .video import VideoError, load_clip

    out = dict(row)
    out.update(frames=b"", frames_shape=[], frame_indices=[], video_fps=None, sampled_fps=None, video_duration_s=None,
               media_type=None if needs_video else "text")
    if row.get("error_type") or not needs_video:
        return out
    vc = VideoConfig(**video_cfg)
    try:
        clip = load_clip(row["video"], vc)
        # resize here, on the CPU workers, so model actors get frames ready to patchify;
        # 28 = patch 14 x merge 2, shared by every Qwen2-VL / Qwen2.5-VL checkpoint
        h, w = smart_resize(clip.frame_height, clip.frame_width, 28, vc.min_pixels, vc.max_pixels)
        frames = resize_frames(clip.frames, h, w).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    except VideoError as e:
        out.update(error_type=e.error_type, error=str(e))
        return out
    except ValueError as e:  # e.g. smart_resize on an absurd aspect ratio
        out.update(error_type="video_unreadable", error=f"{row['video']}: {e}")
        return out
    out.update(frames=frames.tobytes(), frames_shape=list(frames.shape), **clip.row_fields())
    return out


def expand_modes(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (sample, pending mode): the model stage is then strictly one row in, one row out."""
    modes = row["modes"]
    return [{**{k: v for k, v in row.items() if k != "modes"}, "mode": m} for m in modes]


def _sample_row(row: dict, base: dict) -> dict:
    """An output row holding the run's fields and the sample's identity; the rest left null."""
    r = empty_row()
    r.update(base)
    r.update(
        sample_id=row["sample_id"], mode=row["mode"], dataset=row.get("dataset"), video=row.get("video"),
        media_type=row.get("media_type"),
        question=row.get("question"), options=list(row.get("options") or []), problem_type=row.get("problem_type"),
        answer_gt=row.get("answer_gt"), created_at=datetime.now(timezone.utc),
    )
    return r


def _error_result(row: dict, base: dict, error_type: str, error: str) -> dict:
    r = _sample_row(row, base)
    r.update(error_type=error_type, error=error[:2000])
    return r


class ModelStage:
    """A Ray Data actor: loads the model once, decodes batches of (sample, mode) rows.

    Each input row yields exactly one output row in OUTPUT_SCHEMA: a result, or an error row.
    """

    def __init__(self, cfg_json: str, run_id: str, config_hash: str, metrics_actor: Any = None):
        import torch

        from .models import load_model

        self.cfg = Config.model_validate_json(cfg_json)
        if self.cfg.model.device != "cuda":
            torch.set_num_threads(max(1, int(self.cfg.runtime.num_cpus_per_actor)))
        self.lm = load_model(self.cfg.model)
        self.base = dict(schema_version=SCHEMA_VERSION, run_id=run_id, config_hash=config_hash, model=self.cfg.model.name_or_path)
        self.metrics_actor = metrics_actor
        self.actor_id = f"{os.uname().nodename}:{os.getpid()}"
        self.stats = {"samples": 0, "output_tokens": 0, "controller_updates": 0, "decode_s": 0.0, "wait_s": 0.0, "errors": 0}
        self.t_start = time.perf_counter()
        self.t_last_end: float | None = None
        self.t_last_log = time.perf_counter()

    # -- one batch ------------------------------------------------------------------------
    def __call__(self, batch):
        t_in = time.perf_counter()
        if self.t_last_end is not None:
            self.stats["wait_s"] += t_in - self.t_last_end  # idle: waiting for frames upstream
        _maybe_inject_fault()
        rows = batch.to_pylist() if hasattr(batch, "to_pylist") else _columns_to_rows(batch)
        results: list[dict | None] = [None] * len(rows)
        by_mode: dict[str, list[int]] = {}
        prepared: dict[int, Any] = {}
        for i, row in enumerate(rows):
            if row.get("error_type"):
                results[i] = _error_result(row, self.base, row["error_type"], row.get("error") or "")
                continue
            try:
                prepared[i] = self._prepare(row)
            except Exception as e:  # noqa: BLE001 - one bad sample becomes an error row, never a failed batch
                results[i] = _error_result(row, self.base, "internal_error", f"building model inputs: {type(e).__name__}: {e}")
                continue
            by_mode.setdefault(row["mode"], []).append(i)
        for mode, idx in by_mode.items():
            for i, res in zip(idx, self._decode(mode, [prepared[i] for i in idx], [rows[i] for i in idx])):
                results[i] = res
        self._account(results, time.perf_counter() - t_in)
        self.t_last_end = time.perf_counter()
        return rows_to_table(results)

    def _prepare(self, row: dict):
        import numpy as np

        from .prompting import build_text_inputs, build_video_inputs

        c = self.cfg
        if self.lm.is_vl and row.get("frames_shape"):
            frames = np.frombuffer(row["frames"], dtype=np.uint8).reshape(row["frames_shape"])
            return build_video_inputs(
                self.lm.tokenizer, self.lm.vision, frames, row.get("sampled_fps") or 2.0, row["question"],
                row.get("options") or None, row.get("problem_type") or "free_form", c.decoding.prompt,
                c.decoding.system_prompt, c.video.min_pixels, c.video.max_pixels,
            )
        return build_text_inputs(
            self.lm.tokenizer, row["question"], row.get("options") or None, row.get("problem_type") or "free_form",
            c.decoding.prompt, c.decoding.system_prompt if self.lm.is_vl else None,
        )

    def _decode(self, mode: str, inputs: list, rows: list[dict]) -> list[dict]:
        """Decode together; if the batch fails (e.g. out of memory), retry one by one so only the culprit fails."""
        from .decoding import DecodeSettings, decode_batch

        c = self.cfg
        settings = DecodeSettings(
            mode=mode, max_new_tokens=c.decoding.max_new_tokens, stop_strings=list(c.decoding.stop_strings),
            controller=c.controller, prune_ratio=c.lite.prune_ratio,
        )
        try:
            outs = decode_batch(self.lm, inputs, settings)
            return [self._result_row(r, x, o) for r, x, o in zip(rows, inputs, outs)]
        except Exception as batch_err:  # noqa: BLE001 - isolate the failing sample below
            if len(inputs) == 1:
                _free_accelerator_memory()
                return [_error_result(rows[0], self.base, "decode_error", f"{type(batch_err).__name__}: {batch_err}")]
            log.warning("batch of %d failed (%s); retrying one sample at a time", len(inputs), batch_err)
            _free_accelerator_memory()
            return [self._decode(mode, [x], [r])[0] for x, r in zip(inputs, rows)]

    def _result_row(self, row: dict, x, o) -> dict:
        from .scoring import extract_answer, score

        r = _sample_row(row, self.base)
        pt = r["problem_type"] = r["problem_type"] or "free_form"
        pred = extract_answer(o.text, pt, r["options"] or None)
        correct, sc = score(pred, r["answer_gt"], pt)
        r.update(
            output_text=o.text, answer=pred, correct=correct, score=sc, finish_reason=o.finish_reason,
            entropy=o.entropy, entropy_post=o.entropy_post, entropy_ema=o.entropy_ema, alpha=o.alpha,
            num_prompt_tokens=o.num_prompt_tokens, num_video_tokens=o.num_video_tokens,
            num_video_tokens_kept=o.num_video_tokens_kept, num_output_tokens=o.num_output_tokens,
            num_think_tokens=o.num_think_tokens, controller_updates=o.controller_updates,
            ema_peak_step=o.ema_peak_step, frame_indices=row.get("frame_indices") or None,
            num_frames=len(row.get("frame_indices") or []) or None, video_fps=row.get("video_fps"),
            sampled_fps=row.get("sampled_fps"), video_duration_s=row.get("video_duration_s"),
            frame_height=x.frame_height, frame_width=x.frame_width, latency_s=o.latency_s,
        )
        return r

    def _account(self, results: list[dict], decode_s: float) -> None:
        s = self.stats
        s["samples"] += len(results)
        s["decode_s"] += decode_s
        s["errors"] += sum(1 for r in results if r["error_type"])
        s["output_tokens"] += sum(r["num_output_tokens"] or 0 for r in results)
        s["controller_updates"] += sum(r["controller_updates"] or 0 for r in results)
        elapsed = time.perf_counter() - self.t_start
        snapshot = {
            **s,
            "samples_per_s": s["samples"] / elapsed if elapsed else 0.0,
            "output_tokens_per_s": s["output_tokens"] / s["decode_s"] if s["decode_s"] else 0.0,
        }
        if self.metrics_actor is not None:
            self.metrics_actor.record.remote(self.actor_id, snapshot)
        if time.perf_counter() - self.t_last_log >= self.cfg.runtime.progress_interval_s:
            self.t_last_log = time.perf_counter()
            print(
                f"[model-actor {self.actor_id}] samples={s['samples']} ({snapshot['samples_per_s']:.2f}/s) "
                f"out_tok/s={snapshot['output_tokens_per_s']:.1f} updates={s['controller_updates']} "
                f"waiting_for_frames={s['wait_s']:.1f}s errors={s['errors']}",
                flush=True,
            )


def _columns_to_rows(batch: dict) -> list[dict]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _plain(batch[k][i]) for k in keys} for i in range(n)]


def _plain(v):
    return v.tolist() if hasattr(v, "tolist") else v


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _maybe_inject_fault() -> None:
    """Fault injection for tests: the first model batch after the marker is armed kills this process."""
    marker = os.environ.get(FAULT_ENV)
    if marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(17)


def _metrics_collector_class():
    import ray

    @ray.remote(num_cpus=0)
    class MetricsCollector:
        """Latest metrics snapshot of each model actor, for progress lines and the run record."""

        def __init__(self) -> None:
            self.by_actor: dict[str, dict] = {}

        def record(self, actor_id: str, snapshot: dict) -> None:
            self.by_actor[actor_id] = snapshot

        def get(self) -> dict[str, dict]:
            return self.by_actor

    return MetricsCollector


# ---------------------------------------------------------------------------------------------
# The sink (driver)


def shard_key(table) -> str:
    """A deterministic object name from the (sample_id, mode) keys a file holds."""
    keys = sorted(zip(table.column("sample_id").to_pylist(), table.column("mode").to_pylist()))
    h = hashlib.sha256("\n".join(f"{s}\t{m}" for s, m in keys).encode()).hexdigest()[:20]
    return f"part-{h}.parquet"


def write_shard(uri: str, table, compression: str) -> str:
    """Write one table as one whole object under `uri`; returns its URI."""
    import pyarrow.parquet as pq

    from . import storage

    table = table.select(list(OUTPUT_COLUMNS)).cast(OUTPUT_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=None if compression == "none" else compression)
    dest = storage.join(uri, shard_key(table))
    storage.retry(lambda: storage.write_bytes(dest, buf.getvalue()), what=dest)
    return dest


def _code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def write_run_record(cfg: Config, plan: RunPlan, status: str, result: RunResult | None = None, extra: dict | None = None) -> str:
    from . import storage

    record = {
        "run_id": plan.run_id,
        "status": status,
        "schema_version": SCHEMA_VERSION,
        "code_version": _code_version(),
        "config_hash": plan.config_hash,
        "model": cfg.model.name_or_path,
        "config": cfg.model_dump(mode="json"),
        "manifest": plan.manifest_summary,
        "counts": {
            "samples": plan.num_samples,
            "pairs_total": plan.num_pairs_total,
            "pairs_already_done": plan.num_pairs_done,
            "pairs_scheduled": plan.num_pairs_pending,
            "duplicates_in_output_before_run": plan.duplicates_in_output,
        },
        "written_at": datetime.now(timezone.utc).isoformat(),
    }
    if result is not None:
        record["counts"].update(
            rows_written=result.rows_written, rows_failed=result.rows_failed, files_written=result.files_written,
            per_mode=result.per_mode, failed_by_type=result.failed_by_type,
        )
        record["timings"] = {
            "wall_s": result.wall_s,
            "rows_per_s": result.rows_written / result.wall_s if result.wall_s else None,
            "output_tokens": result.output_tokens,
            "output_tokens_per_s": result.output_tokens / result.wall_s if result.wall_s else None,
        }
    if extra:
        record.update(extra)
    dest = storage.join(cfg.output.uri, RUNS_DIR, f"{plan.run_id}.json")
    storage.retry(lambda: storage.write_bytes(dest, json.dumps(record, indent=2, default=str).encode()), what=dest)
    return dest


# ---------------------------------------------------------------------------------------------
# The job


def _needs_video(cfg: Config) -> bool:
    from .models import BUILTIN_SMOLLM2

    name = cfg.model.name_or_path
    return not (cfg.input.text_only or name.endswith(".gguf") or name == BUILTIN_SMOLLM2)


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
        fn_kwargs={"video_cfg": cfg.video.model_dump(), "needs_video": _needs_video(cfg)},
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
    metrics = _metrics_collector_class().remote()
    ds = build_dataset(cfg, plan, metrics)
    progress = _Progress(plan.num_pairs_pending, cfg.runtime.progress_interval_s)
    try:
        for table in ds.iter_batches(batch_size=cfg.output.rows_per_file, batch_format="pyarrow", prefetch_batches=1):
            write_shard(cfg.output.uri, table, cfg.output.compression)
            _tally(result, table)
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


def _tally(res: RunResult, table) -> None:
    rows = table.select(["mode", "error_type", "num_output_tokens"]).to_pylist()
    res.files_written += 1
    for r in rows:
        res.rows_written += 1
        pm = res.per_mode.setdefault(r["mode"], {"rows": 0, "failed": 0})
        pm["rows"] += 1
        if r["error_type"]:
            res.rows_failed += 1
            pm["failed"] += 1
            res.failed_by_type[r["error_type"]] = res.failed_by_type.get(r["error_type"], 0) + 1
        res.output_tokens += r["num_output_tokens"] or 0
