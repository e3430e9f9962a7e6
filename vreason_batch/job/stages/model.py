"""The model stage (GPU actors): stage rows -> one output row per (sample, mode), a result or an error row.

`ModelStage` makes one request per sample with all its modes and hands a call's requests to the
actor's engine run, which the calls in flight share (feeding.py); `model_needs_video` and
`model_batch_rows` tell the pipeline whether the video stage decodes frames and how many stage
rows one actor call takes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any

from vreason_batch.config import Config
from vreason_batch.job.metrics import ActorMetrics
from vreason_batch.job.stages.feeding import SharedEngine
from vreason_batch.job.stages.healing import DeviceUnusable, decode_healing, exit_for_restart, injected_fault
from vreason_batch.io.schema import SCHEMA_VERSION, empty_row, rows_to_table

log = logging.getLogger(__name__)

FAULT_ENV = "VREASON_BATCH_FAULT_ONCE"  # tests: path of a marker; a model actor dies once
# The engine's counts a model actor adds up and reports (EngineStats fields), besides video_decodes
ENGINE_COUNTS = ("vision_encodes", "prefill_tokens", "decode_steps", "busy_slot_steps", "slot_steps")


def model_needs_video(cfg: Config) -> bool:
    """Whether the model reads frames: text-only inputs and text models skip the video stage's work."""
    from vreason_batch.engine.models import BUILTIN_SMOLLM2

    name = cfg.model.name_or_path
    return not (cfg.input.text_only or name.endswith(".gguf") or name == BUILTIN_SMOLLM2)


def model_batch_rows(cfg: Config, num_samples: int, num_videos: int) -> int:
    """Stage rows per model-actor call (Ray Data's batch_size) for about runtime.batch_size samples a call.

    A stage row holds one video's samples (at most batch_size of them); with m samples a video on
    average (the plan counts them), batch_size / m rows hold about batch_size samples.
    """
    bs = cfg.runtime.batch_size
    if not model_needs_video(cfg) or not num_videos:
        return bs  # one sample a row
    per_row = min(float(bs), num_samples / num_videos)
    return max(1, round(bs / per_row))


def _sample_row(row: dict, base: dict) -> dict:
    """An output row holding the run's fields and the sample's identity; the rest left null."""
    r = empty_row()
    r.update(base)
    r.update(
        sample_id=row["sample_id"], mode=row["mode"], dataset=row.get("dataset"), video=row.get("video"),
        media_type=row.get("media_type"), video_backend=row.get("video_backend"),
        question=row.get("question"), options=list(row.get("options") or []), problem_type=row.get("problem_type"),
        answer_gt=row.get("answer_gt"), created_at=datetime.now(timezone.utc),
    )
    return r


def _error_result(row: dict, base: dict, error_type: str, error: str) -> dict:
    r = _sample_row(row, base)
    r.update(error_type=error_type, error=error[:2000])
    return r


def _sample(row: dict, s: dict) -> dict:
    """One sample of a stage row with its video's fields (not the frames): what its output rows show."""
    return {**{k: v for k, v in s.items() if k not in ("modes", "error_type", "error")},
            **{k: row.get(k) for k in ("video", "media_type", "video_backend", "frame_indices", "video_fps",
                                       "sampled_fps", "video_duration_s")}}


class ModelStage:
    """A Ray Data actor: loads the model once; each call decodes a batch of stage rows.

    One request per sample carrying all its pending modes; the batch's requests join the actor's
    engine run through `runtime.decode_slots` slots, beside those of the other calls in flight
    (`runtime.calls_per_actor`, threads: feeding.py); each (sample, mode) yields exactly one output
    row in OUTPUT_SCHEMA: a result, or an error row.
    """

    def __init__(self, cfg_json: str, run_id: str, config_hash: str, metrics_actor: Any = None):
        import torch

        from vreason_batch.engine.loading import load_model
        from vreason_batch.engine.placement import Placement

        if metrics_actor is not None:
            _register_with_driver(metrics_actor)
        self.cfg = Config.model_validate_json(cfg_json)
        if self.cfg.model.device != "cuda":
            torch.set_num_threads(max(1, int(self.cfg.runtime.num_cpus_per_actor)))
        rt = self.cfg.runtime
        self.lm = load_model(self.cfg.model, Placement(num_devices=max(1, int(rt.num_gpus_per_actor)),
                                                       max_memory=rt.max_memory, offload_folder=rt.offload_folder))
        self.base = dict(schema_version=SCHEMA_VERSION, run_id=run_id, config_hash=config_hash, model=self.cfg.model.name_or_path)
        self.metrics_actor = metrics_actor
        self.actor_id = f"{os.uname().nodename}:{os.getpid()}"
        self.metrics = ActorMetrics(self.actor_id)
        self.stats = {"samples": 0, "output_tokens": 0, "controller_updates": 0, "decode_s": 0.0, "wait_s": 0.0, "errors": 0,
                      "video_decodes": 0, **dict.fromkeys(ENGINE_COUNTS, 0)}
        self.t_start = time.perf_counter()
        self.t_last_end: float | None = None
        self.t_last_log = time.perf_counter()
        # runtime.calls_per_actor calls run at once, each in its thread: one engine thread decodes them all
        # on the actor's slots (feeding.py); the stats and metrics are shared, under this lock
        self.engine = SharedEngine(self._run_fed, self._heal)
        self.lock = threading.RLock()
        self.calls_in_flight = 0
        # the calls' threads encode while the engine thread decodes: a fast tokenizer switches off the
        # padding / truncation its file may set on the first encode (a mutable borrow, which fails
        # beside another thread's use: "Already borrowed"); do it now, before any thread starts
        self.lm.tokenizer("warm-up", add_special_tokens=False)

    # -- one batch ------------------------------------------------------------------------
    def __call__(self, batch):
        t_in = time.perf_counter()
        with self.lock:
            if self.t_last_end is not None and not self.calls_in_flight:
                self.stats["wait_s"] += t_in - self.t_last_end  # idle: waiting for frames upstream
                self.metrics.record_frame_wait(t_in - self.t_last_end)
            self.calls_in_flight += 1
        try:
            return self._call(batch)
        finally:
            with self.lock:
                self.calls_in_flight -= 1
                self.t_last_end = time.perf_counter()

    def _call(self, batch):
        from vreason_batch.engine.api import Request

        _maybe_inject_fault()
        rows = batch.to_pylist() if hasattr(batch, "to_pylist") else _columns_to_rows(batch)
        out: list[dict | None] = []  # one per (sample, mode), samples in batch order
        waiting: list[tuple[int, str, str]] = []  # (index in out, request key, mode) of rows to decode
        prepared: dict[str, tuple[dict, Any]] = {}  # by request key, the sample id: (sample, model inputs)
        requests: list[Request] = []
        videos: dict[str, Any] = {}  # video -> its patches (or the error building them), once per call
        with self.lock:
            self.stats["video_decodes"] += sum(row.get("video_decodes") or 0 for row in rows)
        for row in rows:
            for s in row["samples"]:
                sample, modes = _sample(row, s), list(s["modes"])
                err = (s["error_type"], s.get("error")) if s.get("error_type") else (
                    (row["error_type"], row.get("error")) if row.get("error_type") else None)
                x = None
                if err is None:
                    try:
                        x = self._prepare(row, s, videos)
                    except Exception as e:  # noqa: BLE001 - one bad sample becomes error rows, never a failed batch
                        err = ("internal_error", f"building model inputs: {type(e).__name__}: {e}")
                if err is not None:
                    out.extend(_error_result({**sample, "mode": m}, self.base, err[0], err[1] or "") for m in modes)
                    continue
                # the sample's id as its key: a sampled row's draws follow its (seed, sample id, mode),
                # never its place in the batch (ids are unique in a run: the manifest reader sees to it)
                key = sample["sample_id"]
                prepared[key] = (sample, x)
                shared = row["video"] if x.pixel_values_videos is not None else None
                requests.append(Request(key=key, inputs=x, modes=tuple(modes), video_key=shared))
                for m in modes:
                    waiting.append((len(out), key, m))
                    out.append(None)
        t_decode = time.perf_counter()
        try:
            # through the actor's engine run, beside the other calls' in flight (feeding.py), healed (healing.py)
            # when it fails -> {(key, mode): DecodeResult or (error_type, error text)}
            decoded = self.engine.decode(requests) if requests else {}
        except DeviceUnusable as e:  # nothing of this batch is recorded: a fresh actor decodes it
            exit_for_restart(e)
        decode_s = time.perf_counter() - t_decode
        for i, key, m in waiting:
            sample, x = prepared[key]
            o = decoded.get((key, m))
            if o is None:  # a bug in the engine or its feeding, not a fact about this sample: fail the batch, record nothing
                raise RuntimeError(f"the engine returned no result for sample {key!r}, mode {m!r}")
            if isinstance(o, tuple):
                out[i] = _error_result({**sample, "mode": m}, self.base, *o)
            else:
                out[i] = self._result_row({**sample, "mode": m}, x, o)
        decoded_modes = {m for r in requests for m in r.modes}
        with self.lock:
            for mode in dict.fromkeys(r["mode"] for r in out):
                self.metrics.record_mode(mode, [r for r in out if r["mode"] == mode], decode_s if mode in decoded_modes else None)
            self._account(out)
        return rows_to_table(out)

    def _prepare(self, row: dict, s: dict, videos: dict):
        """A sample's model inputs, built once for all its modes; a video's patches once per call."""
        import numpy as np

        from vreason_batch.engine.prompting import build_text_inputs, video_patches, video_question_inputs

        c = self.cfg
        if self.lm.is_vl and row.get("frames_shape"):
            video = row["video"]
            if video not in videos:
                try:
                    # bytearray: a writable [T, H, W, 3] uint8 array; torch.from_numpy warns on (and must
                    # not write into) the read-only buffer that np.frombuffer gives over `bytes`
                    frames = np.frombuffer(bytearray(row["frames"]), dtype=np.uint8).reshape(row["frames_shape"])
                    videos[video] = video_patches(frames, self.lm.vision, c.video.min_pixels, c.video.max_pixels)
                except Exception as e:  # noqa: BLE001 - kept, so every question on this video gets the same error
                    videos[video] = e
            if isinstance(videos[video], Exception):
                raise videos[video]
            return video_question_inputs(
                self.lm.tokenizer, self.lm.vision, videos[video], row.get("sampled_fps") or 2.0, s["question"],
                s.get("options") or None, s.get("problem_type") or "free_form", c.decoding.prompt, c.decoding.system_prompt,
            )
        return build_text_inputs(
            self.lm.tokenizer, s["question"], s.get("options") or None, s.get("problem_type") or "free_form",
            c.decoding.prompt, c.decoding.system_prompt if self.lm.is_vl else None,
        )

    def _engine_call(self, reqs: list, slots: int, **fed) -> dict:
        from vreason_batch.engine.api import DecodeSettings
        from vreason_batch.engine.driver import decode_requests

        injected_fault()
        # the engine takes each request's modes; the settings' own mode is not used
        settings = DecodeSettings.from_config(self.cfg, reqs[0].modes[0])
        t = time.perf_counter()
        results, stats = decode_requests(self.lm, reqs, settings, slots, compiled=self.cfg.runtime.compile, **fed)
        self._count_engine(stats, time.perf_counter() - t)
        return results

    def _run_fed(self, reqs: list, more, finished) -> None:
        self._engine_call(reqs, self.cfg.runtime.decode_slots, more=more, finished=finished)

    def _heal(self, reqs: list, failed: BaseException | None) -> dict:
        return decode_healing(self._engine_call, reqs, self.cfg.runtime.decode_slots, failed)

    def _count_engine(self, stats, seconds: float) -> None:
        """One engine run's counts; its seconds are the engine's busy time (calls in flight overlap)."""
        with self.lock:
            self.stats["decode_s"] += seconds
            for k in ENGINE_COUNTS:
                self.stats[k] += getattr(stats, k)

    def _result_row(self, row: dict, x, o) -> dict:
        from vreason_batch.evaluation.scoring import extract_answer, score

        r = _sample_row(row, self.base)
        pt = r["problem_type"] = r["problem_type"] or "free_form"
        pred = extract_answer(o.output_text, pt, r["options"] or None)
        correct, sc = score(pred, r["answer_gt"], pt)
        r.update(o.columns())
        r.update(
            answer=pred, correct=correct, score=sc, frame_indices=row.get("frame_indices") or None,
            num_frames=len(row.get("frame_indices") or []) or None, video_fps=row.get("video_fps"),
            sampled_fps=row.get("sampled_fps"), video_duration_s=row.get("video_duration_s"),
            frame_height=x.frame_height, frame_width=x.frame_width,
        )
        return r

    def _account(self, results: list[dict]) -> None:
        s = self.stats
        s["samples"] += len(results)
        s["errors"] += sum(1 for r in results if r["error_type"])
        s["output_tokens"] += sum(r["num_output_tokens"] or 0 for r in results)
        s["controller_updates"] += sum(r["controller_updates"] or 0 for r in results)
        elapsed = time.perf_counter() - self.t_start
        snapshot = {
            **s,
            "samples_per_s": s["samples"] / elapsed if elapsed else 0.0,
            "output_tokens_per_s": s["output_tokens"] / s["decode_s"] if s["decode_s"] else 0.0,
            "slot_occupancy": s["busy_slot_steps"] / s["slot_steps"] if s["slot_steps"] else 0.0,
        }
        if self.metrics_actor is not None:
            _report(self.metrics_actor, self.actor_id, snapshot)
        if time.perf_counter() - self.t_last_log >= self.cfg.runtime.progress_interval_s:
            self.t_last_log = time.perf_counter()
            print(
                f"[model-actor {self.actor_id}] samples={s['samples']} ({snapshot['samples_per_s']:.2f}/s) "
                f"out_tok/s={snapshot['output_tokens_per_s']:.1f} updates={s['controller_updates']} "
                f"slot_occupancy={snapshot['slot_occupancy']:.2f} waiting_for_frames={s['wait_s']:.1f}s "
                f"errors={s['errors']}",
                flush=True,
            )


def _report(metrics_actor: Any, actor_id: str, snapshot: dict) -> None:
    """Store this actor's snapshot in the collector before the batch's rows are returned (waited
    for: a few ms a batch), so that the run record, read once the last rows arrive, counts every
    batch whose rows were written. A lost collector costs the metrics, never the batch."""
    import ray
    import ray.exceptions as rx

    try:
        ray.get(metrics_actor.record.remote(actor_id, snapshot), timeout=30)
    except (rx.RayActorError, rx.GetTimeoutError) as e:
        log.warning("metrics collector unreachable (%s); this batch's counts are not in the run record", e)


def _columns_to_rows(batch: dict) -> list[dict]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _plain(batch[k][i]) for k in keys} for i in range(n)]


def _plain(v):
    return v.tolist() if hasattr(v, "tolist") else v


def _maybe_inject_fault() -> None:
    """Fault injection for tests: the first model batch after the marker is armed kills this process."""
    marker = os.environ.get(FAULT_ENV)
    if marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(17)


def _register_with_driver(metrics_actor: Any) -> None:
    """Hand this actor's own handle to the run's collector, so the driver can end the actors of a
    pipeline it gave up on (`pipeline._end_model_actors`). Before loading the model, and waited
    for, so an actor that is up is always known. Ray's restart of this actor registers it again."""
    import ray

    ctx = ray.get_runtime_context()
    ray.get(metrics_actor.register_actor.remote(ctx.get_actor_id(), ctx.current_actor))
