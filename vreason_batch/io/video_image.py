"""Image files with Pillow: a still image is a one-frame clip, an animated GIF / WebP a video.

A still image (PNG, JPEG, GIF, BMP, WebP, TIFF: benchmark files mix `data_type: image` rows in)
is `media_type="image_as_video"`: the model sees it as a still video (patchify repeats the frame
to the temporal patch size). An animated GIF or WebP is a video (`media_type="video"`): its
frames are sampled like a video's, at its own timing (the frame rate is frames / total display
time; a frame delay of 10 ms or less counts as 100 ms, as browsers show it).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from vreason_batch.config import VideoConfig
from vreason_batch.io.clip import (
    VideoClip, VideoError, check_source_size, decode_size, make_clip, sample_indices, short_message,
)

# Browsers show a GIF frame delay of 10 ms or less (0 included) as 100 ms.
MIN_FRAME_DELAY_MS, DEFAULT_FRAME_DELAY_MS = 10, 100


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("image rows need Pillow: pip install pillow") from e
    return Image


def _rgb(Image: Any, im: Any, size: tuple[int, int] | None) -> np.ndarray:
    """The current frame as [H, W, 3] uint8 RGB, resized to `size` (height, width) if given."""
    rgb = im.convert("RGB")
    if size is not None:
        rgb = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def _frame_rate(im: Any) -> float:
    """Frames per second of an animation: its frame count over its total display time."""
    total_ms = 0.0
    for i in range(im.n_frames):
        im.seek(i)
        im.load()  # WebP sets a frame's duration when the frame is loaded
        delay = float(im.info.get("duration") or 0)
        total_ms += delay if delay > MIN_FRAME_DELAY_MS else DEFAULT_FRAME_DELAY_MS
    return im.n_frames / (total_ms / 1000.0)


def _animation(Image: Any, im: Any, height: int, width: int, cfg: VideoConfig) -> VideoClip:
    video_fps = _frame_rate(im)
    total = int(im.n_frames)
    indices = sample_indices(total, video_fps, cfg)
    size = decode_size(height, width, cfg.max_pixels)
    frames = []
    for i in indices:
        im.seek(i)  # Pillow composes each frame onto the ones before it (GIF disposal)
        frames.append(_rgb(Image, im, size))
    return make_clip(np.stack(frames), indices, total, video_fps, height, width, backend="pillow")  # [T, H, W, 3]


def load_image(uri: str, source: str | bytes, cfg: VideoConfig) -> VideoClip:
    """A still image as a one-frame clip [1, H, W, 3] uint8 RGB, or an animated one as a video;
    downscaled like a video frame when huge.

    Raises VideoError("video_unreadable") for an image Pillow cannot decode, "video_too_large"
    over `max_source_pixels` (checked from the header, before decoding the pixels).
    """
    Image = _pillow()
    # Pillow's own bomb guard would raise on sizes our max_source_pixels may allow; ours decides.
    failure = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            width, height = im.size
            check_source_size(uri, height, width, cfg, what="image")
            if getattr(im, "is_animated", False) and im.n_frames > 1:
                return _animation(Image, im, height, width, cfg)
            im.seek(0)
            frame = _rgb(Image, im, decode_size(height, width, cfg.max_pixels))  # [H, W, 3]
    except VideoError:
        raise
    except failure as e:
        raise VideoError("video_unreadable", f"image {uri}: cannot be decoded ({short_message(e)})") from None
    return VideoClip(
        frames=frame[None], frame_indices=[0], video_fps=0.0, sampled_fps=0.0, duration_s=0.0,
        height=int(height), width=int(width), num_frames=1, media_type="image_as_video", backend="pillow",
    )
