"""The stages of the job, run in Ray workers: plain functions and one actor class, testable without Ray.

block of samples -> `video_stage` (CPU tasks: `load_video_row` decodes, samples and resizes
frames; `expand_modes` gives one row per pending mode) -> `ModelStage` (GPU actors: one output row per input row, a result
or an error row in OUTPUT_SCHEMA).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from typing import Any

from .config import Config
from .metrics import ActorMetrics
from .schema import SCHEMA_VERSION, empty_row, rows_to_table

log = logging.getLogger(__name__)

FAULT_ENV = "VREASON_BATCH_FAULT_ONCE"  # tests: path of a marker; a model actor dies once


def model_needs_video(cfg: Config) -> bool:
    """Whether the model reads frames: text-only inputs and text models skip the video stage's work."""
    from .models import BUILTIN_SMOLLM2

    name = cfg.model.name_or_path
    return not (cfg.input.text_only or name.endswith(".gguf") or name == BUILTIN_SMOLLM2)


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


def stage_schema():
    """The Arrow schema of rows between the video stage and the model actors."""
    import pyarrow as pa

    text, ints, num = pa.string(), pa.list_(pa.int64()), pa.float64()
    return pa.schema([
        ("sample_id", text), ("video", text), ("question", text), ("dataset", text), ("options", pa.list_(text)),
        ("answer_gt", text), ("problem_type", text), ("error_type", text), ("error", text), ("mode", text),
        ("frames", pa.binary()), ("frames_shape", ints), ("frame_indices", ints), ("video_fps", num),
        ("sampled_fps", num), ("video_duration_s", num), ("media_type", text),
    ])


def video_stage(block, video_cfg: dict, needs_video: bool):
    """A block of pending samples (plan_schema) -> one row per (sample, pending mode), with frames or an error.

    A generator over the whole block: each sample's rows with frames are yielded as soon as they
    are decoded, so model actors start while the task goes on; rows without frames (errors, text
    questions) are small and go on together at the end, so a block of missing videos costs Ray
    one output block, not one per sample. What is yielded depends only on the block's content, as
    Ray's replay of a retried generator task requires.
    """
    import pyarrow as pa

    schema = stage_schema()
    light: list[dict] = []
    for row in block.to_pylist():
        rows = expand_modes(load_video_row(row, video_cfg, needs_video))
        if rows and rows[0]["frames_shape"]:
            yield pa.Table.from_pylist(rows, schema=schema)
        else:
            light.extend(rows)
    if light:
        yield pa.Table.from_pylist(light, schema=schema)


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

        if metrics_actor is not None:
            _register_with_driver(metrics_actor)
        self.cfg = Config.model_validate_json(cfg_json)
        if self.cfg.model.device != "cuda":
            torch.set_num_threads(max(1, int(self.cfg.runtime.num_cpus_per_actor)))
        self.lm = load_model(self.cfg.model)
        self.base = dict(schema_version=SCHEMA_VERSION, run_id=run_id, config_hash=config_hash, model=self.cfg.model.name_or_path)
        self.metrics_actor = metrics_actor
        self.actor_id = f"{os.uname().nodename}:{os.getpid()}"
        self.metrics = ActorMetrics(self.actor_id)
        self.stats = {"samples": 0, "output_tokens": 0, "controller_updates": 0, "decode_s": 0.0, "wait_s": 0.0, "errors": 0}
        self.t_start = time.perf_counter()
        self.t_last_end: float | None = None
        self.t_last_log = time.perf_counter()

    # -- one batch ------------------------------------------------------------------------
    def __call__(self, batch):
        t_in = time.perf_counter()
        if self.t_last_end is not None:
            self.stats["wait_s"] += t_in - self.t_last_end  # idle: waiting for frames upstream
            self.metrics.record_frame_wait(t_in - self.t_last_end)
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
        mode_s: dict[str, float] = {}
        for mode, idx in by_mode.items():
            t_mode = time.perf_counter()
            for i, res in zip(idx, self._decode(mode, [prepared[i] for i in idx], [rows[i] for i in idx])):
                results[i] = res
            mode_s[mode] = time.perf_counter() - t_mode
        for mode in dict.fromkeys(r["mode"] for r in results):
            self.metrics.record_mode(mode, [r for r in results if r["mode"] == mode], mode_s.get(mode))
        self._account(results, time.perf_counter() - t_in)
        self.t_last_end = time.perf_counter()
        return rows_to_table(results)

    def _prepare(self, row: dict):
        import numpy as np

        from .prompting import build_text_inputs, build_video_inputs

        c = self.cfg
        if self.lm.is_vl and row.get("frames_shape"):
            # bytearray: a writable [T, H, W, 3] uint8 array; torch.from_numpy warns on (and must
            # not write into) the read-only buffer that np.frombuffer gives over `bytes`
            frames = np.frombuffer(bytearray(row["frames"]), dtype=np.uint8).reshape(row["frames_shape"])
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

        settings = DecodeSettings.from_config(self.cfg, mode)
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


def _register_with_driver(metrics_actor: Any) -> None:
    """Hand this actor's own handle to the run's collector, so the driver can end the actors of a
    pipeline it gave up on (`pipeline._end_model_actors`). Before loading the model, and waited
    for, so an actor that is up is always known. Ray's restart of this actor registers it again."""
    import ray

    ctx = ray.get_runtime_context()
    ray.get(metrics_actor.register_actor.remote(ctx.get_actor_id(), ctx.current_actor))


def metrics_collector_class():
    import ray

    @ray.remote(num_cpus=0)
    class MetricsCollector:
        """Latest metrics snapshot of each model actor, for progress lines and the run record;
        and the handles of the model actors started since the driver last took them."""

        def __init__(self) -> None:
            self.by_actor: dict[str, dict] = {}
            self.actors: dict[str, Any] = {}

        def register_actor(self, ray_actor_id: str, handle: Any) -> None:
            self.actors[ray_actor_id] = handle

        def take_actors(self) -> list:
            """The registered model actor handles, forgotten here (so they no longer keep the actors alive)."""
            taken, self.actors = list(self.actors.values()), {}
            return taken

        def record(self, actor_id: str, snapshot: dict) -> None:
            self.by_actor[actor_id] = snapshot

        def get(self) -> dict[str, dict]:
            return self.by_actor

    return MetricsCollector
