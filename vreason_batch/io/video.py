"""Frame sampling with decord from local files and s3:// objects. Knows nothing about models.

Frames are sampled like Qwen2.5-VL / Video-R1: evenly spaced indices over the whole video
(`num_frames`, or `target_fps` capped by `max_frames`), returned as RGB uint8 at source
resolution, except that very large sources are downscaled while decoding.

An image file (PNG, JPEG, GIF, BMP, WebP, TIFF: benchmark files mix `data_type: image` rows in)
is read with Pillow as a one-frame clip, `media_type="image_as_video"`: the model sees it as a
still video (patchify repeats the frame to the temporal patch size), through the video path.

Every way a video can be bad ends as a `VideoError` whose `error_type` is one of
`schema.ERROR_TYPES`; storage trouble that outlasts the retries (throttling, network) is left
as a `storage.StorageError` so that the task can be retried rather than recorded as bad data.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from vreason_batch.io import storage
from vreason_batch.config import VideoConfig
from vreason_batch.io.schema import ERROR_TYPES

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

    frames: np.ndarray  # [T, H, W, 3] uint8 RGB; H, W = source size unless downscaled
    frame_indices: list[int]  # source frame index of each of the T frames, increasing
    video_fps: float  # the source's average frame rate
    sampled_fps: float  # T / duration_s: the rate the model sees
    duration_s: float  # source frame count / video_fps
    height: int  # source height in pixels
    width: int  # source width in pixels
    num_frames: int  # frames in the source (not the number sampled: that is len(frame_indices))
    media_type: str = "video"  # MEDIA_TYPES: "video", or "image_as_video" (one still frame)

    def row_fields(self) -> dict[str, Any]:
        """The output columns this clip fills (an image has no frame rate or duration: null)."""
        still = self.media_type != "video"
        return {
            "media_type": self.media_type,
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


def _import_decord() -> Any:
    try:
        import decord
    except ImportError as e:
        raise ImportError("video decoding needs decord: pip install 'decord>=0.6.0'") from e
    return decord


# ---------------------------------------------------------------------------------------------
# Pure helpers


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


def sniff_container(head: bytes) -> str | None:
    """The container format from a file's first bytes, or None if it is not a video we know.

    Checked before decord sees the data: decord handles some garbage badly (and echoes a
    non-video buffer into its error log), and the first bytes are enough to rule out text,
    images and random data.
    """
    if len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"):
        return "mp4/mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska/webm"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"FLV"):
        return "flv"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return "asf/wmv"
    if head.startswith(b"\x00\x00\x01\xba") or head.startswith(b"\x00\x00\x01\xb3"):
        return "mpeg-ps"
    if head[:1] == b"\x47" and (len(head) <= 188 or head[188:189] == b"\x47"):
        return "mpeg-ts"
    if head.startswith(b"\x00\x00\x00\x01") or head.startswith(b"\x00\x00\x01"):
        return "h264/h265 elementary stream"
    return None


def sniff_image(head: bytes) -> str | None:
    """The image format from a file's first bytes (formats Pillow reads), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


# ---------------------------------------------------------------------------------------------
# Loading

_SNIFF_BYTES = 256


def _open_source(uri: str) -> tuple[str | bytes, str]:
    """(a local path or an object's bytes, "video" | "image"), after the cheap checks (exists,
    not empty, a video container or an image)."""
    if storage.is_s3(uri):
        try:
            data = storage.read_bytes(uri)
        except storage.NotFound:
            raise VideoError("video_not_found", f"video {uri}: no such S3 object") from None
        except storage.AccessDenied:
            # S3 answers 403, not 404, for a missing key when the caller may not list the bucket.
            raise VideoError("video_not_found", f"video {uri}: access denied (missing, or not readable)") from None
        head, size, source = data[:_SNIFF_BYTES], len(data), data
    else:
        _, _, path = storage.parse_uri(uri)
        if not os.path.isfile(path):
            what = "is a directory" if os.path.isdir(path) else "no such file"
            raise VideoError("video_not_found", f"video {uri}: {what}")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
        source = path
    if size == 0:
        raise VideoError("video_empty", f"video {uri}: the file is empty (0 bytes)")
    if sniff_container(head) is not None:
        return source, "video"
    if sniff_image(head) is not None:
        return source, "image"
    raise VideoError(
        "video_unreadable",
        f"video {uri}: neither a recognised video container nor an image ({size} bytes starting {head[:8]!r})",
    )


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


def _short(exc: BaseException) -> str:
    """decord's first message line, shortened: its errors carry C++ stack traces."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def load_clip(uri: str, cfg: VideoConfig) -> VideoClip:
    """Sample frames from a local video or s3:// object, per `cfg` (see module docstring).

    Raises VideoError for a missing / empty / undecodable / too large video. An image file gives
    a one-frame clip (see module docstring).
    """
    source, kind = _open_source(uri)
    if kind == "image":
        return load_image(uri, source, cfg)
    decord = _import_decord()
    failure = _decord_failure(decord)
    try:
        reader = _reader(decord, source)
        total = len(reader)
        video_fps = float(reader.get_avg_fps())
        # Decode one frame for the source size: decord exposes no size without decoding.
        height, width = reader.next().shape[:2]
    except failure as e:
        raise VideoError("video_unreadable", f"video {uri}: cannot be opened or decoded ({_short(e)})") from None
    if not (math.isfinite(video_fps) and video_fps > 0):
        raise VideoError("video_unreadable", f"video {uri}: reports no usable frame rate ({video_fps})")
    if height * width > cfg.max_source_pixels:
        raise VideoError(
            "video_too_large",
            f"video {uri}: {width}x{height} = {width * height} pixels per frame is over"
            f" video.max_source_pixels = {cfg.max_source_pixels}",
        )

    indices = sample_indices(total, video_fps, cfg)
    size = decode_size(height, width, cfg.max_pixels)
    try:
        if size is not None:
            reader = _reader(decord, source, height=size[0], width=size[1])
        frames = _to_numpy(reader.get_batch(indices))  # [T, H, W, 3] uint8
    except failure as e:
        raise VideoError(
            "video_unreadable",
            f"video {uri}: {total} frames announced but frames {indices[0]}..{indices[-1]}"
            f" could not be decoded; truncated or corrupt? ({_short(e)})",
        ) from None
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[3] != 3:
        raise VideoError(
            "video_unreadable",
            f"video {uri}: decoded {frames.shape} for {len(indices)} frames",
        )
    duration_s = total / video_fps
    return VideoClip(
        frames=frames,
        frame_indices=indices,
        video_fps=video_fps,
        sampled_fps=len(indices) / duration_s,
        duration_s=duration_s,
        height=int(height),
        width=int(width),
        num_frames=total,
    )


def load_image(uri: str, source: str | bytes, cfg: VideoConfig) -> VideoClip:
    """One image as a one-frame clip [1, H, W, 3] uint8 RGB, downscaled like a video frame when huge.

    Raises VideoError("video_unreadable") for an image Pillow cannot decode, "video_too_large"
    over `max_source_pixels` (checked from the header, before decoding the pixels).
    """
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("image rows need Pillow: pip install pillow") from e
    # Pillow's own bomb guard would raise on sizes our max_source_pixels may allow; ours decides.
    failure = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            width, height = im.size
            if height * width > cfg.max_source_pixels:
                raise VideoError(
                    "video_too_large",
                    f"image {uri}: {width}x{height} = {width * height} pixels is over"
                    f" video.max_source_pixels = {cfg.max_source_pixels}",
                )
            im.seek(0)  # an animated GIF / WebP: its first frame
            rgb = im.convert("RGB")
            size = decode_size(height, width, cfg.max_pixels)
            if size is not None:
                rgb = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            frame = np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]
    except VideoError:
        raise
    except failure as e:
        raise VideoError("video_unreadable", f"image {uri}: cannot be decoded ({_short(e)})") from None
    return VideoClip(
        frames=frame[None],
        frame_indices=[0],
        video_fps=0.0,
        sampled_fps=0.0,
        duration_s=0.0,
        height=int(height),
        width=int(width),
        num_frames=1,
        media_type="image_as_video",
    )
