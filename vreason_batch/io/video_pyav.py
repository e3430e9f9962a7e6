"""Frame-accurate sampling with PyAV: the frames at the requested indices, on every container.

Frame i is the i-th frame in presentation order. The packets' timestamps are read first (demux
only, nothing decoded) and sorted, so frame i is the one whose pts is the i-th. Each wanted frame
is then reached by seeking to the keyframe at or before it and decoding forward (or by decoding on,
when that is nearer), and frames are taken by pts: where a seek lands does not decide which frame
is returned. A seek has to land on its keyframe: one that lands after it is tried again by dts
(MPEG-TS / PS seek by dts), one whose frame there is not a key frame (a demuxer that flags
non-intra packets) backs off to the keyframe before, and in the end the file is decoded from its
start. A stream whose packets carry no pts is decoded from the start and its frames counted.

FFmpeg's log lines are switched off while PyAV works (video_probe.quiet_ffmpeg), so they never
reach the job log; a decode error still raises, and its text goes to the row.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Iterator

import numpy as np

from vreason_batch.config import VideoConfig
from vreason_batch.io.clip import (
    VideoClip, VideoError, check_frame_rate, check_source_size, decode_size, make_clip, rotate, sample_indices,
    short_message,
)
from vreason_batch.io import mp4_index
from vreason_batch.io.remote_video import VideoSource
from vreason_batch.io.video_probe import import_av, is_mov, open_container, open_source, quiet_ffmpeg

# Keyframes tried before a frame (nearest first) before decoding it from the file's start.
MAX_SEEK_BACKOFFS = 3
# A seek (and the decoder flush after it) is worth about this many decoded frames: a wanted frame
# nearer than that past the keyframe ahead is reached by decoding on.
SEEK_COST_FRAMES = 8


@dataclass
class FrameTable:
    """The video stream's frames as the demuxer lists them, before any decoding."""

    pts: list[int] | None  # sorted presentation timestamps (frame i has pts[i]); None: packets carry none
    count: int  # frames in the stream
    keyframes: list[int] = field(default_factory=list)  # sorted pts of packets flagged as keyframes
    keyframe_dts: dict[int, int] = field(default_factory=dict)  # a keyframe's pts -> its packet's dts
    announced: int = 0  # frames the header announces (0: it does not say)
    packets: int = 0  # video packets demuxed, discarded ones included


def index_frames(container: Any, stream: Any) -> FrameTable:
    """Demux the whole video stream (no decoding) and list its frames' timestamps."""
    pts, keys, packets, missing_pts = set(), {}, 0, 0
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream flush packet
            continue
        packets += 1
        if packet.is_discard:  # before an mp4 edit list's start: not shown
            continue
        if packet.pts is None:
            missing_pts += 1
            continue
        pts.add(packet.pts)
        if packet.is_keyframe:
            keys[packet.pts] = packet.dts if packet.dts is not None else packet.pts
    announced = int(stream.frames or 0)
    if missing_pts:
        return FrameTable(pts=None, count=packets, announced=announced, packets=packets)
    return FrameTable(pts=sorted(pts), count=len(pts), keyframes=sorted(keys), keyframe_dts=keys,
                      announced=announced, packets=packets)


# Packets demuxed to check a frame table read from the file's index against the demuxer's timestamps.
INDEX_CHECK_PACKETS = 64


def index_from_moov(av: Any, container: Any, stream: Any, source: VideoSource) -> FrameTable | None:
    """The frame table of an MP4 / MOV from its sample tables (io/mp4_index.py), read without demuxing
    the file, or None (another container, a case that path does not handle, or a table that disagrees
    with the first INDEX_CHECK_PACKETS packets the demuxer reads: timestamps, key flags, first frame)."""
    if not is_mov(container.format.name):
        return None
    with open_source(source) as f:
        moov = mp4_index.read_moov(f)
    found = mp4_index.frame_table_arrays(moov, int(stream.id)) if moov else None
    if found is None or stream.time_base is None or stream.time_base != Fraction(1, found["timescale"]):
        return None
    keys = found["keyframe_dts"]
    table = FrameTable(pts=found["pts"], count=found["count"], keyframes=sorted(keys), keyframe_dts=keys,
                       announced=int(stream.frames or 0), packets=found["count"])
    listed, seen = set(table.pts), []
    with open_container(av, source) as check:  # its own container: `container` is demuxed whole if this fails
        for packet in check.demux(check.streams.video[0]):  # (the stream `stream` is: the first video stream)
            if packet.size == 0:
                continue
            if packet.is_discard or packet.pts not in listed or packet.is_keyframe != (packet.pts in keys):
                return None
            seen.append(packet.pts)
            if len(seen) == min(INDEX_CHECK_PACKETS, table.count):
                break
    return table if seen and min(seen) == table.pts[0] else None


def frame_rate(stream: Any, table: FrameTable) -> float:
    """The average frame rate the stream declares, else the one its timestamps span."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate:
            return float(rate)
    if table.pts and table.count > 1 and stream.time_base:
        span_s = float((table.pts[-1] - table.pts[0]) * stream.time_base)
        if span_s > 0:
            return (table.count - 1) / span_s
    return 0.0


class _Run:
    """Decoding forward from one starting point; `last` is the key of the last frame it produced.

    A frame's key is its pts, or with `by_count` its position in the decoded stream. A run that
    seeked checks that it started where it meant to: the frame at `start` comes out first (frames
    before it, an open GOP's leading frames, are skipped) and is a key frame; otherwise (another
    frame, or none before the end) BadStart.
    """

    class BadStart(Exception):
        """The run did not start at the key frame it seeked to."""

    def __init__(self, frames: Iterator[Any], start: int | None, counts: dict[str, int], by_count: bool = False):
        self.frames, self.start, self.by_count, self.counts = frames, start, by_count, counts
        self.last: int | None = None
        self.first: int | None = None  # key of the first frame decoded: where the seek landed
        self.checked = start is None

    def take(self, key: int) -> Any | None:
        """The frame with `key`, or None when the stream goes past it (or ends) without it."""
        for frame in self.frames:
            self.counts["decoded"] += 1
            k = (0 if self.last is None else self.last + 1) if self.by_count else frame.pts
            if k is None:
                raise ValueError("a decoded frame has no timestamp")
            if self.first is None:
                self.first = k
            if not self.checked:
                if k < self.start:
                    continue
                if k != self.start or not frame.key_frame:
                    raise _Run.BadStart()
                self.checked = True
            self.last = k
            if k == key:
                return frame
            if k > key:
                return None
        if not self.checked:  # the seek went past the keyframe, to the end
            raise _Run.BadStart()
        return None


class _Decoder:
    """Takes frames by key from one container, seeking only when it pays (see module docstring)."""

    def __init__(self, av: Any, source: VideoSource, table: FrameTable):
        self.av, self.source, self.table = av, source, table
        self.container: Any = None
        self.run: _Run | None = None
        self.seek_broken = table.pts is None  # then the only way is forward from the start
        self.bad_keyframes: set[int] = set()
        self.by_dts = False  # seek by the keyframe's dts rather than its pts (learnt per file)
        self.counts = {"decoded": 0, "seeks": 0, "restarts": 0}  # what it cost, for tests and benchmarks

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None

    def _open(self) -> Any:
        self.close()
        self.container = open_container(self.av, self.source)
        stream = self.container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads; only settable before the first decode
        return stream

    def _from_start(self) -> _Run:
        # A fresh container: decoding from the very first packet, whatever seeking does.
        stream = self._open()
        self.counts["restarts"] += 1
        return _Run(self.container.decode(stream), None, self.counts, by_count=self.table.pts is None)

    def _seek(self, keyframe: int, by_dts: bool) -> _Run:
        stream = self.container.streams.video[0] if self.container is not None else self._open()
        target = self.table.keyframe_dts[keyframe] if by_dts else keyframe
        self.counts["seeks"] += 1
        try:
            self.container.seek(target, stream=stream, backward=True, any_frame=False)
        except self.av.error.FFmpegError:  # a demuxer that cannot seek (or not to there)
            self.seek_broken = True
            raise _Run.BadStart() from None
        return _Run(self.container.decode(stream), keyframe, self.counts)

    def _keyframes_before(self, key: int) -> list[int]:
        keys = self.table.keyframes
        upto = bisect.bisect_right(keys, key)
        return [k for k in reversed(keys[:upto]) if k not in self.bad_keyframes][:MAX_SEEK_BACKOFFS]

    def _nearer_on(self, last: int, keyframe: int, key: int) -> bool:
        """Whether decoding on from `last` to `key` costs less than a seek to `keyframe` (by pts)."""
        if keyframe <= last:
            return True
        pos = self.table.pts
        on = bisect.bisect_left(pos, key) - bisect.bisect_left(pos, last)
        return on <= bisect.bisect_left(pos, key) - bisect.bisect_left(pos, keyframe) + SEEK_COST_FRAMES

    def _seek_and_take(self, keyframe: int, key: int) -> tuple[bool, Any | None]:
        """(whether the seek to `keyframe` started right, the frame with `key` if it did).

        Demuxers seek by pts (mp4, Matroska) or by dts (MPEG-TS / PS: a pts seek lands after the
        keyframe there): the other one is tried when the first lands wrong, and kept if it works.
        """
        orders = [self.by_dts] + ([not self.by_dts] if self.table.keyframe_dts[keyframe] != keyframe else [])
        for by_dts in orders:
            try:
                self.run = self._seek(keyframe, by_dts)
                frame = self.run.take(key)
            except _Run.BadStart:
                if self.seek_broken:
                    return False, None
                continue
            self.by_dts = by_dts
            return True, frame
        return False, None

    def frame(self, key: int) -> Any | None:
        """The decoded frame with `key` (keys asked for in increasing order), or None if missing."""
        run = self.run
        if run is not None and run.last is not None and run.last < key:
            ahead = self._keyframes_before(key)
            if self.seek_broken or not ahead or self._nearer_on(run.last, ahead[0], key):
                return run.take(key)
        if not self.seek_broken:
            for keyframe in self._keyframes_before(key):
                started, frame = self._seek_and_take(keyframe, key)
                if started:
                    if run is not None and run.last is not None and self.run.first <= run.last:
                        self.seek_broken = True  # it landed behind the last run: decoding on is cheaper
                    return frame
                if self.seek_broken:
                    break
                self.bad_keyframes.add(keyframe)
            self.seek_broken = True
        self.run = self._from_start()
        return self.run.take(key)


def _converter(degrees: int, size: tuple[int, int] | None) -> Callable[[Any], np.ndarray]:
    """A decoded frame -> [H, W, 3] uint8 RGB as displayed, at `size` (display orientation) if given."""
    quarter = round(degrees / 90) % 2 == 1

    def convert(frame: Any) -> np.ndarray:
        if size is None:
            rgb = frame.to_ndarray(format="rgb24")
        else:
            h, w = (size[1], size[0]) if quarter else size  # resized in the stored orientation
            rgb = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BICUBIC")
        return rotate(rgb, degrees)  # [H, W, 3]

    return convert


def _open_table(av: Any, uri: str, source: VideoSource, cfg: VideoConfig) -> tuple[FrameTable, float]:
    """(the frame table, the frame rate) after the checks that need no decoding."""
    with open_container(av, source) as container:
        if not container.streams.video:
            raise VideoError("video_unreadable", f"video {uri}: has no video stream")
        stream = container.streams.video[0]
        check_source_size(uri, int(stream.codec_context.height), int(stream.codec_context.width), cfg)
        table = index_from_moov(av, container, stream, source) or index_frames(container, stream)
        rate = frame_rate(stream, table)
    if table.count == 0:
        raise VideoError("video_unreadable", f"video {uri}: its video stream has no frames")
    if table.announced > table.packets:
        raise VideoError(
            "video_unreadable",
            f"video {uri}: {table.announced} frames announced but only {table.packets} present; truncated?",
        )
    check_frame_rate(uri, rate)
    return table, rate


def _sample(av: Any, uri: str, source: VideoSource, cfg: VideoConfig, counts: dict[str, int]) -> VideoClip:
    table, rate = _open_table(av, uri, source, cfg)
    indices = sample_indices(table.count, rate, cfg)
    keys = indices if table.pts is None else [table.pts[i] for i in indices]
    decoder = _Decoder(av, source, table)
    frames, convert, height, width = [], None, 0, 0
    try:
        for i, key in zip(indices, keys):
            frame = decoder.frame(key)
            if frame is None:
                raise VideoError(
                    "video_unreadable",
                    f"video {uri}: frame {i} of the {table.count} listed could not be decoded; truncated or corrupt?",
                )
            if convert is None:  # the first frame says how the video is displayed
                height, width = (frame.width, frame.height) if round(frame.rotation / 90) % 2 else (frame.height, frame.width)
                convert = _converter(frame.rotation, decode_size(height, width, cfg.max_pixels))
            frames.append(convert(frame))
    finally:
        decoder.close()
        counts.update(decoder.counts)
    return make_clip(np.stack(frames), indices, table.count, rate, height, width, backend="pyav")  # [T, H, W, 3]


def load_pyav(uri: str, source: VideoSource, cfg: VideoConfig, counts: dict[str, int] | None = None) -> VideoClip:
    """Sample frames from a local path or an object's bytes with PyAV, frame-accurately.

    Raises VideoError ("video_unreadable", "video_too_large") for a video that cannot be used.
    `counts`, when given, receives what the sampling cost: frames decoded, seeks, restarts from
    the file's start.
    """
    av = import_av()
    with quiet_ffmpeg(av):
        try:
            return _sample(av, uri, source, cfg, {} if counts is None else counts)
        except (av.error.FFmpegError, ValueError) as e:
            raise VideoError(
                "video_unreadable", f"video {uri}: cannot be decoded ({short_message(e)})"
            ) from None
