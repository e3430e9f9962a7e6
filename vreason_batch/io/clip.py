"""What every video reader returns and raises: VideoClip, VideoError, and the pure sampling maths.

Frames are sampled like Qwen2.5-VL / Video-R1: evenly spaced indices over the whole video
(`num_frames`, or `target_fps` capped by `max_frames`). Frame i is the i-th frame in
presentation order, whichever reader decodes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vreason_batch.config import VideoConfig
from vreason_batch.io.schema import ERROR_TYPES, VIDEO_BACKENDS

# Decode at most this many times `max_pixels` per frame: enough detail for the model-side resize
# (which rounds to its patch grid), without carrying 4K frames through the object store.
DECODE_PIXELS_HEADROOM = 4


class VideoError(Exception):
    """A video that cannot be used; `error_type` is a stable string from schema.ERROR_TYPES."""

    def __init__(self, error_type: str, message: str):
        if error_type not in ERROR_TYPES:
            raise ValueError(f"unknown error_type {error_type!r}; expected one of {ERROR_TYPES}")
        # Both in args, so the error survives pickling (Ray ships exceptions between processes).
        super().__init__(error_type, message)
        self.error_type = error_type
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class VideoClip:
    """Sampled frames of one video and what is known about the source."""

    frames: np.ndarray  # [T, H, W, 3] uint8 RGB, as displayed (rotation applied); downscaled if huge
    frame_indices: list[int]  # source frame index of each of the T frames, increasing
    video_fps: float  # the source's average frame rate
    sampled_fps: float  # T / duration_s: the rate the model sees
    duration_s: float  # source frame count / video_fps
    height: int  # source height in pixels, as displayed
    width: int  # source width in pixels, as displayed
    num_frames: int  # frames in the source (not the number sampled: that is len(frame_indices))
    media_type: str = "video"  # MEDIA_TYPES: "video", or "image_as_video" (one still frame)
    backend: str = "decord"  # VIDEO_BACKENDS: the reader that decoded the frames

    def __post_init__(self) -> None:
        if self.backend not in VIDEO_BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {VIDEO_BACKENDS}")

    def row_fields(self) -> dict[str, Any]:
        """The output columns this clip fills (an image has no frame rate or duration: null)."""
        still = self.media_type != "video"
        return {
            "media_type": self.media_type,
            "video_backend": self.backend,
            "frame_indices": [int(i) for i in self.frame_indices],
            "video_fps": None if still else float(self.video_fps),
            "sampled_fps": None if still else float(self.sampled_fps),
            "video_duration_s": None if still else float(self.duration_s),
        }

    @property
    def frame_height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def frame_width(self) -> int:
        return int(self.frames.shape[2])


def sample_indices(total_frames: int, video_fps: float, cfg: VideoConfig) -> list[int]:
    """Evenly spaced frame indices over the whole video, first and last frame included.

    `num_frames` of them, or with `target_fps` one per 1/target_fps seconds up to `max_frames`.
    A video with fewer frames than asked for gives all of its frames, each once.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if cfg.target_fps is None:
        wanted = cfg.num_frames
    else:
        duration_s = total_frames / video_fps
        wanted = min(max(1, math.floor(duration_s * cfg.target_fps + 0.5)), cfg.max_frames)
    if wanted >= total_frames:
        return list(range(total_frames))
    # linspace steps are >= 1 here, so rounding keeps the indices distinct.
    return np.linspace(0, total_frames - 1, wanted).round().astype(int).tolist()


def decode_size(height: int, width: int, max_pixels: int) -> tuple[int, int] | None:
    """(height, width) to decode at when the source exceeds the pixel budget, else None.

    Keeps the aspect ratio; sides are even because some scalers and codecs require it.
    """
    budget = DECODE_PIXELS_HEADROOM * max_pixels
    if height * width <= budget:
        return None
    scale = math.sqrt(budget / (height * width))
    return max(2, int(height * scale) // 2 * 2), max(2, int(width * scale) // 2 * 2)


def check_source_size(uri: str, height: int, width: int, cfg: VideoConfig, what: str = "video") -> None:
    """VideoError("video_too_large") when a frame is over `video.max_source_pixels`."""
    if height * width > cfg.max_source_pixels:
        raise VideoError(
            "video_too_large",
            f"{what} {uri}: {width}x{height} = {width * height} pixels per frame is over"
            f" video.max_source_pixels = {cfg.max_source_pixels}",
        )


def check_frame_rate(uri: str, video_fps: float) -> None:
    if not (math.isfinite(video_fps) and video_fps > 0):
        raise VideoError("video_unreadable", f"video {uri}: reports no usable frame rate ({video_fps})")


def rotate(frame: np.ndarray, degrees: int) -> np.ndarray:
    """A stored frame [H, W, 3] turned as it is displayed.

    `degrees` is the display matrix's counter-clockwise rotation (FFmpeg's
    av_display_rotation_get, PyAV's VideoFrame.rotation): a phone's portrait clip says -90.
    """
    quarter_turns = round(degrees / 90) % 4
    return frame if quarter_turns == 0 else np.ascontiguousarray(np.rot90(frame, k=quarter_turns))


def short_message(exc: BaseException) -> str:
    """An error's first message line, shortened: decord's errors carry C++ stack traces."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def make_clip(frames: np.ndarray, indices: list[int], total: int, video_fps: float, height: int, width: int,
              backend: str) -> VideoClip:
    """A video's VideoClip from its sampled frames [T, H, W, 3] and the source's counts."""
    duration_s = total / video_fps
    return VideoClip(
        frames=frames, frame_indices=indices, video_fps=video_fps, sampled_fps=len(indices) / duration_s,
        duration_s=duration_s, height=int(height), width=int(width), num_frames=total, backend=backend,
    )
