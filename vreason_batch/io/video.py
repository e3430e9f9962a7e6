"""Video in: a local file or s3:// object -> sampled frames (VideoClip), or a VideoError.

What a file is, the bytes decide (never its name): an image goes to Pillow (video_image.py: a
still image is a one-frame clip, an animated GIF / WebP a video); a video container is probed
with PyAV (video_probe.py) and read by the backend `video.backend` names, or with "auto" by the
one that is right for it: decord (video_decord.py) where it is known to be right, PyAV
(video_pyav.py, frame-accurate on every container) where it is not, and PyAV again when decord
fails to open or decode a file. An s3:// object over S3_IN_MEMORY_MAX_BYTES is never fetched
into memory (remote_video.py): PyAV reads it in ranged GETs (and "auto" picks PyAV for it),
decord from a temporary copy on disk.
Every reader returns the frames at the sampled indices, as displayed (rotation applied), and says
in `VideoClip.backend` which one it was.

Every way a video can be bad ends as a `VideoError` whose `error_type` is one of
`schema.ERROR_TYPES`; storage trouble that outlasts the retries (throttling, network) is left
as a `storage.StorageError` so that the task can be retried rather than recorded as bad data.
"""

from __future__ import annotations

import os

from vreason_batch.config import VideoConfig
from vreason_batch.io import storage
from vreason_batch.io.clip import VideoClip, VideoError, decode_size, sample_indices
from vreason_batch.io.remote_video import RemoteVideo, VideoSource as Source
from vreason_batch.io.video_decord import load_decord
from vreason_batch.io.video_image import load_image
from vreason_batch.io.video_probe import Probe, choose_backend, probe
from vreason_batch.io.video_pyav import load_pyav

__all__ = [
    "VideoClip", "VideoError", "decode_size", "load_clip", "sample_indices", "sniff_container", "sniff_image",
]


def sniff_container(head: bytes) -> str | None:
    """The container format from a file's first bytes, or None if it is not a video we know.

    Checked before a decoder sees the data: decord handles some garbage badly (and echoes a
    non-video buffer into its error log), and the first bytes are enough to rule out text,
    images and random data. Only the bytes are looked at: the name may lie.
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
    # Two sync bytes 188 apart: one "G" alone is also how a GIF starts.
    if head[:1] == b"\x47" and head[188:189] == b"\x47":
        return "mpeg-ts"
    if head[4:5] == b"\x47" and len(head) > 196 and head[196:197] == b"\x47":
        return "mpeg-ts (m2ts)"  # 192-byte packets: a 4-byte timestamp before each (camcorders, Blu-ray)
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
# An s3:// video larger than this is not fetched into memory: PyAV reads it through ranged GETs
# (remote_video.RemoteVideo), decord from a temporary copy on disk. Smaller ones are one GET.
S3_IN_MEMORY_MAX_BYTES = 64 * 2**20


def _open_s3(uri: str) -> tuple[Source, bytes, int]:
    try:
        size = storage.s3_object_size(uri)
        if size > S3_IN_MEMORY_MAX_BYTES:
            remote = RemoteVideo(uri, size)
            return remote, remote.head(_SNIFF_BYTES), size
        data = storage.read_bytes(uri)
    except storage.NotFound:
        raise VideoError("video_not_found", f"video {uri}: no such S3 object") from None
    except storage.AccessDenied:
        # S3 answers 403, not 404, for a missing key when the caller may not list the bucket.
        raise VideoError("video_not_found", f"video {uri}: access denied (missing, or not readable)") from None
    return data, data[:_SNIFF_BYTES], len(data)


def _open_source(uri: str) -> tuple[Source, str]:
    """(a local path, an object's bytes or a RemoteVideo; "video" | "image"), after the cheap
    checks (exists, not empty, a video container or an image)."""
    if storage.is_s3(uri):
        source, head, size = _open_s3(uri)
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
        # Pillow takes the bytes; an image over the in-memory limit is fetched whole all the same.
        return (storage.read_bytes(uri) if isinstance(source, RemoteVideo) else source), "image"
    raise VideoError(
        "video_unreadable",
        f"video {uri}: neither a recognised video container nor an image ({size} bytes starting {head[:8]!r})",
    )


def _load_decord(uri: str, source: Source, found: Probe, cfg: VideoConfig) -> VideoClip:
    if isinstance(source, RemoteVideo):  # decord takes a path or bytes: a copy on disk, not in RAM
        with source.spooled() as path:
            return load_decord(uri, path, found, cfg)
    return load_decord(uri, source, found, cfg)


def load_clip(uri: str, cfg: VideoConfig) -> VideoClip:
    """Sample frames from a local video or s3:// object, per `cfg` (see module docstring).

    Raises VideoError for a missing / empty / undecodable / too large video, or a file without a
    video stream.
    """
    source, kind = _open_source(uri)
    if kind == "image":
        return load_image(uri, source, cfg)
    found = probe(uri, source)
    # decord's peak memory grows with the file (README, "Video readers"); PyAV's through ranged
    # reads does not, so auto reads a large S3 object with PyAV.
    large_remote = isinstance(source, RemoteVideo) and cfg.backend == "auto"
    if large_remote or choose_backend(found, cfg.backend) == "pyav":
        return load_pyav(uri, source, cfg)
    try:
        return _load_decord(uri, source, found, cfg)
    except VideoError as e:
        if cfg.backend != "auto" or e.error_type != "video_unreadable":
            raise
        decord_error = e
    try:
        return load_pyav(uri, source, cfg)
    except VideoError as e:
        raise VideoError(e.error_type, f"{e.message} (decord failed too: {decord_error.message})") from None
