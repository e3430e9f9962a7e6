"""The video stage (CPU tasks): a block of pending samples -> one stage row per video, its frames decoded once.

Each distinct video of a block is decoded, sampled and resized once; its row carries the frames
once and the list of its samples with their pending modes (`stage_schema`), for the model stage.
"""

from __future__ import annotations

from typing import Any

from vreason_batch.config import VideoConfig

# A sample's fields in a stage row (the plan's columns less the video, which the row holds once)
SAMPLE_FIELDS = ("sample_id", "question", "dataset", "options", "answer_gt", "problem_type", "error_type", "error",
                 "modes")


def video_groups(samples: list[dict], needs_video: bool) -> list[list[dict]]:
    """The samples of a block grouped by video, videos in order of their first sample.

    Samples without a video (text questions), or all samples when the model reads no frames,
    share nothing: a group of one each.
    """
    groups: list[list[dict]] = []
    by_video: dict[str, list[dict]] = {}
    for s in samples:
        v = s.get("video")
        if needs_video and v:
            if v not in by_video:
                by_video[v] = []
                groups.append(by_video[v])
            by_video[v].append(s)
        else:
            groups.append([s])
    return groups


def load_video(video: str, vc: VideoConfig) -> dict[str, Any]:
    """Decode, sample and resize one video's frames (CPU): a stage row's video fields, or its error."""
    import torch

    from vreason_batch.engine.prompting import resize_frames, smart_resize
    from vreason_batch.io.video import VideoError, load_clip

    try:
        clip = load_clip(video, vc)
        # resize here, on the CPU workers, so model actors get frames ready to patchify;
        # 28 = patch 14 x merge 2, shared by every Qwen2-VL / Qwen2.5-VL checkpoint
        h, w = smart_resize(clip.frame_height, clip.frame_width, 28, vc.min_pixels, vc.max_pixels)
        frames = resize_frames(clip.frames, h, w).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    except VideoError as e:
        return {"error_type": e.error_type, "error": str(e)}
    except ValueError as e:  # e.g. smart_resize on an absurd aspect ratio
        return {"error_type": "video_unreadable", "error": f"{video}: {e}"}
    return dict(frames=frames.tobytes(), frames_shape=list(frames.shape), **clip.row_fields())  # frames [T, H, W, 3] uint8


def video_rows(group: list[dict], vc: VideoConfig, needs_video: bool, max_samples_per_row: int) -> list[dict]:
    """One video's samples (plan rows) -> its stage rows: the video decoded once (unless no sample
    can use it), its frames in each row, at most `max_samples_per_row` samples a row.

    A video with more samples than that is carried in several rows (frames repeated once per
    `max_samples_per_row` samples), so one model-actor call stays about runtime.batch_size samples.
    `video_decodes` is 1 on the first row of a decoded video (failed decodes included), else 0.
    """
    video = group[0].get("video")
    row: dict[str, Any] = dict(
        video=video, error_type=None, error=None, frames=b"", frames_shape=[], frame_indices=[], video_fps=None,
        sampled_fps=None, video_duration_s=None, media_type=None if needs_video else "text", video_backend=None,
        video_decodes=0,
    )
    if needs_video and any(not s.get("error_type") for s in group):
        row.update(load_video(video, vc), video_decodes=1)
    samples = [{k: s.get(k) for k in SAMPLE_FIELDS} for s in group]
    n = max_samples_per_row
    return [{**row, "samples": samples[i:i + n], "video_decodes": row["video_decodes"] if i == 0 else 0}
            for i in range(0, len(samples), n)]


def stage_schema():
    """The Arrow schema of rows between the video stage and the model actors: one video (its frames
    once, or its error) and the samples asking about it. Internal; not a user contract."""
    import pyarrow as pa

    text, ints, num, texts = pa.string(), pa.list_(pa.int64()), pa.float64(), pa.list_(pa.string())
    sample = pa.struct([(f, texts if f in ("options", "modes") else text) for f in SAMPLE_FIELDS])
    return pa.schema([
        ("video", text), ("error_type", text), ("error", text),  # the video's error: every sample of the row gets it
        ("frames", pa.binary()), ("frames_shape", ints), ("frame_indices", ints), ("video_fps", num),
        ("sampled_fps", num), ("video_duration_s", num), ("media_type", text), ("video_backend", text),
        ("video_decodes", pa.int64()),
        ("samples", pa.list_(sample)),
    ])


def video_stage(block, video_cfg: dict, needs_video: bool, max_samples_per_row: int):
    """A block of pending samples (plan_schema) -> stage rows: each distinct video decoded once.

    A generator over the whole block: each video's rows are yielded as soon as it is decoded, so
    model actors start while the task goes on; rows without frames (errors, text questions) are
    small and go on together at the end, so a block of missing videos costs Ray one output block,
    not one per sample. What is yielded depends only on the block's content, as Ray's replay of a
    retried generator task requires.
    """
    import pyarrow as pa

    schema = stage_schema()
    vc = VideoConfig(**video_cfg)
    light: list[dict] = []
    for group in video_groups(block.to_pylist(), needs_video):
        rows = video_rows(group, vc, needs_video, max_samples_per_row)
        if rows[0]["frames_shape"]:
            yield pa.Table.from_pylist(rows, schema=schema)
        else:
            light.extend(rows)
    if light:
        yield pa.Table.from_pylist(light, schema=schema)
