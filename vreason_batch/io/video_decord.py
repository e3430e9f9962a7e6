"""Frame sampling with decord: fast where it is right (see video_probe.py for where it is not).

decord applies an mp4 / mov display matrix itself (a portrait phone clip comes out upright) but
not a Matroska one, which is applied here. Its bundled FFmpeg is kept quiet: decord raises its
own errors, so FFmpeg's log lines are chatter only.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from vreason_batch.config import VideoConfig
from vreason_batch.io.clip import (
    VideoClip, VideoError, check_frame_rate, check_source_size, decode_size, make_clip, rotate, sample_indices,
    short_message,
)
from vreason_batch.io.video_probe import Probe, first_frame_rotation

# Frame widths at which decord 0.6.0's RGB copy fails (measured on every even width 8..418 and
# 640..1920, at several heights: the width alone decides). A downscale avoids them.
DECORD_BAD_WIDTHS = frozenset({8, 12, 16, 24, 48, 72})


def import_decord() -> Any:
    try:
        import decord
    except ImportError as e:
        raise ImportError("video decoding needs decord: pip install 'decord>=0.6.0'") from e
    decord.logging.set_level(decord.logging.QUIET)  # its FFmpeg's chatter: decord raises its own errors
    return decord


def _reader(decord: Any, source: str | bytes, **kwargs: Any) -> Any:
    # A fresh BytesIO per reader: decord copies the buffer out of it when it opens.
    return decord.VideoReader(io.BytesIO(source) if isinstance(source, bytes) else source, **kwargs)


def _decord_failure(decord: Any) -> tuple[type[BaseException], ...]:
    """What decord raises on bad input: its own error, plus the Python-side checks in VideoReader."""
    return (decord.base.DECORDError, RuntimeError, AssertionError, IndexError, ValueError, StopIteration)


def _to_numpy(batch: Any) -> np.ndarray:
    # decord's output type follows a process-wide "bridge" that other libraries may switch to
    # torch (qwen-vl-utils does); accept either.
    return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)


def load_decord(uri: str, source: str | bytes, found: Probe, cfg: VideoConfig) -> VideoClip:
    """Sample frames from a local path or an object's bytes with decord, per `cfg`.

    Raises VideoError ("video_unreadable", "video_too_large") for a video that cannot be used.
    """
    decord = import_decord()
    failure = _decord_failure(decord)
    # decord turns mp4 / mov frames as displayed; a Matroska display matrix is ours to apply.
    degrees = first_frame_rotation(source) if found.is_matroska else 0
    try:
        reader = _reader(decord, source)
        total = len(reader)
        video_fps = float(reader.get_avg_fps())
        # Decode one frame for the size as decord returns it: it exposes no size without decoding.
        height, width = reader.next().shape[:2]
    except failure as e:
        raise VideoError("video_unreadable", f"video {uri}: cannot be opened or decoded ({short_message(e)})") from None
    check_frame_rate(uri, video_fps)
    check_source_size(uri, int(height), int(width), cfg)

    indices = sample_indices(total, video_fps, cfg)
    size = decode_size(height, width, cfg.max_pixels)  # in decord's output orientation
    if size is not None and size[1] in DECORD_BAD_WIDTHS:
        size = (size[0], size[1] + 2)
    try:
        if size is not None:
            reader = _reader(decord, source, height=size[0], width=size[1])
        frames = _to_numpy(reader.get_batch(indices))  # [T, H, W, 3] uint8
    except failure as e:
        raise VideoError(
            "video_unreadable",
            f"video {uri}: {total} frames announced but frames {indices[0]}..{indices[-1]}"
            f" could not be decoded; truncated or corrupt? ({short_message(e)})",
        ) from None
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[3] != 3:
        raise VideoError("video_unreadable", f"video {uri}: decoded {frames.shape} for {len(indices)} frames")
    if round(degrees / 90) % 4:
        frames = np.stack([rotate(f, degrees) for f in frames])  # [T, H, W, 3] as displayed
        if round(degrees / 90) % 2:
            height, width = width, height
    return make_clip(frames, indices, total, video_fps, int(height), int(width), backend="decord")
