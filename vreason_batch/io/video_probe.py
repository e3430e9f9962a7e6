"""Which reader decodes a video: a probe of its container, codec and frame size, and the `auto` rule.

The probe is what PyAV reads when it opens the file (no frame is sampled); the rule picks decord
or PyAV for `video.backend: auto`.

The rule follows what was measured with decord 0.6.0 (tests/io/test_video_backends.py keeps it
honest): decord is right and fast on H.264 / HEVC / VP9 / MPEG-4 ... in mp4 / mov / mkv / webm /
avi, but its seek lands on other frames in MPEG transport and program streams, it has no AV1
decoder, and its RGB copy fails on some narrow frames (8, 12, 16, 24, 48 and 72 pixels wide).
And a long MP4 / MOV goes to PyAV too: decord lists its frames by demuxing every packet when it
opens the file, PyAV reads them from the sample tables (io/mp4_index.py).
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from vreason_batch.io.clip import VideoError, short_message
from vreason_batch.io.remote_video import RemoteVideo, VideoSource

# Containers whose timestamps decord 0.6 does not seek by correctly (FFmpeg demuxer names).
UNSEEKABLE_FOR_DECORD = ("mpegts", "mpeg", "mpegvideo")
# Codecs (FFmpeg canonical names) decord 0.6 was found to decode right (issue 19's survey, and the
# tests); any other codec goes to PyAV, which is right on all of them.
DECORD_CODECS = frozenset({"h264", "hevc", "vp9", "mpeg4", "mjpeg", "prores", "ffv1"})
# Frames narrower or lower than this go to PyAV: decord fails on some small widths (see above; a
# display rotation turns a low frame into a narrow one), and small frames are cheap either way.
DECORD_MIN_SIDE = 80
# An MP4 / MOV with more frames than this goes to PyAV (5 minutes at 30 fps): decord's open demuxes
# every packet (16 frames from a 60-minute clip took 3.4x those from a 1-minute one; PyAV 1.35x).
LONG_MP4_FRAMES = 9000


@dataclass(frozen=True)
class Probe:
    """What the container's header says about its first video stream."""

    container: str  # FFmpeg demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "mpegts", "matroska,webm"
    codec: str  # FFmpeg canonical codec name, e.g. "h264", "av1"
    height: int  # stored size (before any display rotation)
    width: int
    frames: int = 0  # frames the header announces (0: it does not say)

    @property
    def is_matroska(self) -> bool:
        return self.container.startswith("matroska")


def import_av() -> Any:
    try:
        import av
    except ImportError as e:
        raise ImportError("video decoding needs PyAV: pip install 'av>=18'") from e
    return av


@contextmanager
def quiet_ffmpeg(av: Any) -> Iterator[None]:
    """FFmpeg's log lines switched off while PyAV works, whatever PyAV's logging level is.

    Decoder chatter ("co located POCs unavailable" and the like) would otherwise fill the job's
    log once anything turns PyAV's logging on. Off, not captured: with logging on, FFmpeg's frame
    threads call into Python to log, and closing a container then deadlocks (the closing thread
    holds the GIL while it waits for them; seen with PyAV 18). A decode error still raises, with
    FFmpeg's error text, and that goes to the row. Process-wide for its duration.
    """
    level = av.logging.get_level()
    if level is not None:
        av.logging.set_level(None)
    try:
        yield
    finally:
        if level is not None:
            av.logging.set_level(level)


def open_source(source: VideoSource) -> Any:
    """A fresh binary file object on a local path, an object's bytes or a large S3 object read in ranges."""
    if isinstance(source, RemoteVideo):
        return source.open()
    return io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")


def is_mov(container: str) -> bool:
    """Whether an FFmpeg demuxer name is the MP4 / MOV (ISO BMFF) one, "mov,mp4,m4a,3gp,3g2,mj2"."""
    return "mov" in (container or "").split(",")


def open_container(av: Any, source: VideoSource) -> Any:
    """An input container on a local path (FFmpeg's own file I/O), an object's bytes or a large S3
    object read in ranges (a fresh file object each time)."""
    return av.open(open_source(source) if isinstance(source, (bytes, RemoteVideo)) else source, mode="r")


def _stream_list(container: Any) -> str:
    kinds = [f"{s.type} ({s.codec_context.name if s.codec_context else '?'})" for s in container.streams]
    return ", ".join(kinds) or "none"


def probe(uri: str, source: VideoSource) -> Probe:
    """The first video stream's container, codec and size, or VideoError("video_unreadable") for a
    file FFmpeg cannot open or one without a video stream (an audio-only .m4a, say)."""
    av = import_av()
    with quiet_ffmpeg(av):
        try:
            with open_container(av, source) as container:
                if not container.streams.video:
                    raise VideoError(
                        "video_unreadable",
                        f"video {uri}: has no video stream (streams: {_stream_list(container)})",
                    )
                stream = container.streams.video[0]
                codec = stream.codec_context.codec
                return Probe(
                    container=container.format.name,
                    codec=codec.canonical_name or codec.name,
                    height=int(stream.codec_context.height),
                    width=int(stream.codec_context.width),
                    frames=int(stream.frames or 0),
                )
        except av.error.FFmpegError as e:
            raise VideoError(
                "video_unreadable", f"video {uri}: cannot be opened ({short_message(e)})"
            ) from None


def choose_backend(found: Probe, requested: str) -> str:
    """The backend that reads a probed video: `requested`, or for "auto" the rule above."""
    if requested != "auto":
        return requested
    if found.container in UNSEEKABLE_FOR_DECORD:  # decord's seek lands on other frames
        return "pyav"
    if found.codec not in DECORD_CODECS:  # AV1, and codecs decord was never checked on
        return "pyav"
    if min(found.height, found.width) < DECORD_MIN_SIDE:  # decord's RGB copy fails on some
        return "pyav"
    if is_mov(found.container) and found.frames > LONG_MP4_FRAMES:  # decord indexes every packet
        return "pyav"
    return "decord"


def first_frame_rotation(source: VideoSource) -> int:
    """The display rotation (counter-clockwise degrees) of the first video frame, 0 if none.

    Decodes one frame: PyAV hands the display matrix over with decoded frames only.
    """
    av = import_av()
    with quiet_ffmpeg(av):
        try:
            with open_container(av, source) as container:
                frame = next(container.decode(container.streams.video[0]), None)
                return int(frame.rotation) if frame is not None else 0
        except (av.error.FFmpegError, IndexError):
            return 0  # the reader that decodes the video reports what is wrong with it
