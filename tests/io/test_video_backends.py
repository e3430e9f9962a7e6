"""video backends: every reader returns the frames its indices name, on clips of several containers
and codecs generated here (each frame shows its own index); how `auto` chooses; orientation;
animated images; files without video; FFmpeg's log lines kept out of the log."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
from videos import (
    REAL_VIDEOS,
    bright_quadrants,
    encoder_available,
    frame_index,
    quadrant_frame,
    real_video,
    write_audio_only,
    write_counter_animation,
    write_counter_clip,
    write_rotated_clip,
)

from vreason_batch.config import VideoConfig
from vreason_batch.io import remote_video, storage, video, video_probe, video_pyav
from vreason_batch.io.schema import OUTPUT_SCHEMA, VIDEO_BACKENDS
from vreason_batch.io.video import VideoError, load_clip, sample_indices, sniff_container
from vreason_batch.io.video_probe import Probe, choose_backend

av = pytest.importorskip("av")

FRAMES, FPS = 60, 10
H264 = {"crf": "12", "bf": "3", "g": "12", "x264-params": "scenecut=0"}  # B-frames, a keyframe every 12
MPEG2 = {"b": "2000000", "bf": "2", "g": "12"}
AV1 = {"crf": "20", "g": "12"}
AV1_ENCODERS = ("libsvtav1", "libaom-av1", "librav1e")


def _av1_encoder() -> str | None:
    return next((e for e in AV1_ENCODERS if encoder_available(e)), None)


# name: (file, muxer, encoder, codec options, container options, (width, height), backends that
# read it right, what auto picks)
CLIPS = {
    "mp4-h264": ("c.mp4", "mp4", "libx264", H264, None, (128, 96), ("decord", "pyav"), "decord"),
    "mkv-h264": ("c.mkv", "matroska", "libx264", H264, None, (128, 96), ("decord", "pyav"), "decord"),
    "webm-vp9": ("c.webm", "webm", "libvpx-vp9", {"crf": "10", "b": "0", "g": "12"}, None, (128, 96),
                 ("decord", "pyav"), "decord"),
    "ts-h264": ("c.ts", "mpegts", "libx264", H264, None, (128, 96), ("pyav",), "pyav"),
    "ts-mpeg2": ("c2.ts", "mpegts", "mpeg2video", MPEG2, None, (128, 96), ("pyav",), "pyav"),
    "ps-mpeg2": ("c.mpg", "mpeg", "mpeg2video", MPEG2, None, (128, 96), ("pyav",), "pyav"),
    "m2ts-h264": ("c.m2ts", "mpegts", "libx264", H264, {"mpegts_m2ts_mode": "1"}, (128, 96), ("pyav",), "pyav"),
    "mp4-av1": ("av1.mp4", "mp4", "av1", AV1, None, (128, 96), ("pyav",), "pyav"),
    "webm-av1": ("av1.webm", "webm", "av1", AV1, None, (128, 96), ("pyav",), "pyav"),
    "mp4-h264-16x16": ("tiny.mp4", "mp4", "libx264", H264, None, (16, 16), ("pyav",), "pyav"),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Every clip this PyAV build can encode, by name."""
    folder = tmp_path_factory.mktemp("clips")
    made = {}
    for name, (file, muxer, encoder, options, container_options, (w, h), _, _) in CLIPS.items():
        encoder = _av1_encoder() if encoder == "av1" else encoder
        if encoder is None or not encoder_available(encoder):
            continue
        made[name] = write_counter_clip(folder / file, muxer, encoder, FRAMES, FPS, w, h, options, container_options)
    return made


def _clip(clips: dict[str, Path], name: str) -> Path:
    if name not in clips:
        pytest.skip(f"this PyAV build has no encoder for {name}")
    return clips[name]


def _indices(frames: np.ndarray) -> list[int]:
    return [frame_index(f) for f in frames]


SAMPLINGS = {
    "8-frames": VideoConfig(num_frames=8),
    "every-frame": VideoConfig(num_frames=FRAMES),
    "1-frame": VideoConfig(num_frames=1),
    "3-fps": VideoConfig(target_fps=3.0),
}


# ---------------------------------------------------------------------------------------------
# The frames are the ones the indices name


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("name", CLIPS)
def test_every_reader_returns_the_frames_its_indices_name(clips, name, sampling):
    path = _clip(clips, name)
    readers, auto = CLIPS[name][6], CLIPS[name][7]
    for backend in (*readers, "auto"):
        cfg = SAMPLINGS[sampling].model_copy(update={"backend": backend})
        clip = load_clip(str(path), cfg)
        assert clip.backend == (auto if backend == "auto" else backend)
        assert clip.num_frames == FRAMES and clip.video_fps == pytest.approx(FPS)
        assert clip.frame_indices == sample_indices(FRAMES, FPS, cfg)
        assert _indices(clip.frames) == clip.frame_indices, f"{name} via {backend}: frames other than the indices"
        assert clip.row_fields()["video_backend"] == clip.backend


@pytest.mark.parametrize("name", REAL_VIDEOS)
def test_decord_and_pyav_give_the_same_pixels_on_real_mp4s(name):
    path = str(real_video(name))
    by_decord = load_clip(path, VideoConfig(num_frames=8, backend="decord"))
    by_pyav = load_clip(path, VideoConfig(num_frames=8, backend="pyav"))
    assert by_pyav.frame_indices == by_decord.frame_indices and by_pyav.num_frames == by_decord.num_frames
    assert by_pyav.video_fps == pytest.approx(by_decord.video_fps)
    assert np.array_equal(by_pyav.frames, by_decord.frames)  # same frames, same YUV -> RGB conversion


def test_pyav_reads_from_s3_bytes(clips, s3_bucket):
    uri = f"s3://{s3_bucket}/videos/c.ts"
    storage.write_bytes(uri, _clip(clips, "ts-h264").read_bytes())
    clip = load_clip(uri, VideoConfig(num_frames=8))
    assert clip.backend == "pyav" and _indices(clip.frames) == clip.frame_indices


def test_a_transport_stream_is_detected_by_its_bytes_not_its_name(clips, tmp_path):
    named_mp4 = tmp_path / "broadcast.mp4"
    named_mp4.write_bytes(_clip(clips, "ts-mpeg2").read_bytes())
    clip = load_clip(str(named_mp4), VideoConfig(num_frames=8))
    assert clip.backend == "pyav" and _indices(clip.frames) == clip.frame_indices
    assert sniff_container(_clip(clips, "m2ts-h264").read_bytes()[:256]) == "mpeg-ts (m2ts)"


@pytest.mark.parametrize("name", ["ts-h264", "mp4-h264", "mkv-h264"])
def test_pyav_seeks_rather_than_decoding_the_whole_file(tmp_path, name):
    file, muxer, encoder, options, container_options = CLIPS[name][:5]
    path = write_counter_clip(tmp_path / file, muxer, encoder, 240, FPS, 128, 96, {**options, "g": "24"},
                              container_options)
    counts: dict[str, int] = {}
    clip = video_pyav.load_pyav(str(path), str(path), VideoConfig(num_frames=3), counts)
    assert _indices(clip.frames) == clip.frame_indices == [0, 120, 239]
    # each wanted frame is at most a GOP (24 frames, plus B-frame delay) past its keyframe
    assert counts["decoded"] <= 3 * 30 and counts["restarts"] == 0, counts


# ---------------------------------------------------------------------------------------------
# PyAV when the container misleads it


def test_keyframe_flags_that_lie_still_give_the_right_frames(clips, monkeypatch):
    real = video_pyav.index_frames

    def every_packet_a_keyframe(container, stream):
        table = real(container, stream)
        table.keyframes, table.keyframe_dts = list(table.pts), {p: p for p in table.pts}
        return table

    monkeypatch.setattr(video_pyav, "index_frames", every_packet_a_keyframe)
    monkeypatch.setattr(video_pyav, "index_from_moov", lambda *args: None)  # the demuxer's table, lying
    path = _clip(clips, "mp4-h264")
    counts: dict[str, int] = {}
    clip = video_pyav.load_pyav(str(path), str(path), VideoConfig(num_frames=4), counts)
    assert _indices(clip.frames) == clip.frame_indices
    # frame 20 is not a key frame: the seeks to it and the two "keyframes" before it are found
    # out (MAX_SEEK_BACKOFFS), and the rest is decoded on from the file's start
    assert counts["seeks"] == 1 + video_pyav.MAX_SEEK_BACKOFFS and counts["restarts"] == 1, counts


class _NoSeek:
    """A container whose seek fails, as some demuxers' do."""

    def __init__(self, container):
        self._container = container

    def seek(self, *args, **kwargs):
        raise av.error.FFmpegError(1, "seek not supported")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._container.close()

    def __getattr__(self, name):
        return getattr(self._container, name)


def test_a_container_that_cannot_seek_is_decoded_from_the_start(clips, monkeypatch):
    real = video_pyav.open_container
    monkeypatch.setattr(video_pyav, "open_container", lambda av_, source: _NoSeek(real(av_, source)))
    path = _clip(clips, "ts-h264")
    counts: dict[str, int] = {}
    clip = video_pyav.load_pyav(str(path), str(path), VideoConfig(num_frames=8), counts)
    assert _indices(clip.frames) == clip.frame_indices
    assert counts["restarts"] == 1 and counts["decoded"] == FRAMES


def test_packets_without_timestamps_are_counted_from_the_start(clips, monkeypatch):
    real = video_pyav.index_frames

    def no_pts(container, stream):
        table = real(container, stream)
        return video_pyav.FrameTable(pts=None, count=table.count, announced=table.announced, packets=table.packets)

    monkeypatch.setattr(video_pyav, "index_frames", no_pts)
    path = _clip(clips, "mkv-h264")
    clip = video_pyav.load_pyav(str(path), str(path), VideoConfig(num_frames=8))
    assert _indices(clip.frames) == clip.frame_indices


# ---------------------------------------------------------------------------------------------
# How auto chooses


def _probe(container="mov,mp4,m4a,3gp,3g2,mj2", codec="h264", width=1280, height=720, frames=300) -> Probe:
    return Probe(container=container, codec=codec, height=height, width=width, frames=frames)


def test_auto_chooses_by_what_the_file_is():
    assert choose_backend(_probe(), "auto") == "decord"
    assert choose_backend(_probe(container="matroska,webm", codec="vp9"), "auto") == "decord"
    assert choose_backend(_probe(container="mpegts"), "auto") == "pyav"
    assert choose_backend(_probe(container="mpeg", codec="mpeg2video"), "auto") == "pyav"
    assert choose_backend(_probe(codec="av1"), "auto") == "pyav"
    assert choose_backend(_probe(codec="some_new_codec"), "auto") == "pyav"
    assert choose_backend(_probe(width=16, height=16), "auto") == "pyav"
    # a long mp4: PyAV reads its frame table from the sample tables, decord demuxes every packet
    assert choose_backend(_probe(frames=video_probe.LONG_MP4_FRAMES + 1), "auto") == "pyav"
    assert choose_backend(_probe(container="matroska,webm", frames=10**6), "auto") == "decord"
    # a backend named in the config is used as it is
    assert choose_backend(_probe(container="mpegts"), "decord") == "decord"
    assert choose_backend(_probe(), "pyav") == "pyav"


def test_auto_falls_back_to_pyav_when_decord_fails(tmp_path, monkeypatch):
    # 48 pixels wide: decord 0.6's RGB copy fails on it; let auto send it to decord anyway
    monkeypatch.setattr(video_probe, "DECORD_MIN_SIDE", 1)
    path = write_counter_clip(tmp_path / "narrow.mp4", "mp4", "libx264", 20, FPS, 48, 96, H264)
    clip = load_clip(str(path), VideoConfig(num_frames=5))
    assert clip.backend == "pyav" and _indices(clip.frames) == clip.frame_indices
    with pytest.raises(VideoError) as e:
        load_clip(str(path), VideoConfig(num_frames=5, backend="decord"))
    assert e.value.error_type == "video_unreadable" and str(path) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Files that are not (only) video


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_audio_only_file_says_it_has_no_video_stream(tmp_path, backend):
    path = write_audio_only(tmp_path / "voice.m4a")
    with pytest.raises(VideoError) as e:
        load_clip(str(path), VideoConfig(backend=backend))
    assert e.value.error_type == "video_unreadable"
    assert "has no video stream" in str(e.value) and "audio" in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("fmt, suffix", [("GIF", ".gif"), ("WEBP", ".webp")])
def test_animated_image_is_a_video_sampled_at_its_own_timing(tmp_path, fmt, suffix):
    path = write_counter_animation(tmp_path / f"anim{suffix}", fmt, num_frames=20, delay_ms=50)
    clip = load_clip(str(path), VideoConfig(num_frames=6))
    assert clip.media_type == "video" and clip.backend == "pillow"
    assert clip.num_frames == 20 and clip.video_fps == pytest.approx(20.0) and clip.duration_s == pytest.approx(1.0)
    assert clip.frame_indices == [0, 4, 8, 11, 15, 19] and _indices(clip.frames) == clip.frame_indices
    by_rate = load_clip(str(path), VideoConfig(target_fps=4.0))  # 1 s at 4 fps
    assert _indices(by_rate.frames) == by_rate.frame_indices == [0, 6, 13, 19]
    fields = clip.row_fields()
    assert fields["media_type"] == "video" and fields["video_fps"] == pytest.approx(20.0)


def test_gif_frame_delay_of_zero_plays_at_ten_fps_and_a_still_gif_stays_an_image(tmp_path):
    path = write_counter_animation(tmp_path / "fast.gif", "GIF", num_frames=10, delay_ms=0)
    assert load_clip(str(path), VideoConfig()).video_fps == pytest.approx(10.0)
    still = write_counter_animation(tmp_path / "still.gif", "GIF", num_frames=1)
    clip = load_clip(str(still), VideoConfig())
    assert clip.media_type == "image_as_video" and clip.backend == "pillow" and clip.frames.shape[0] == 1


# ---------------------------------------------------------------------------------------------
# Display orientation


@pytest.mark.parametrize("muxer, suffix", [("mp4", ".mp4"), ("matroska", ".mkv")])
@pytest.mark.parametrize("rotation", [-90, 90, 180])
@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_rotated_video_comes_out_as_displayed(tmp_path, muxer, suffix, rotation, backend):
    path = write_rotated_clip(tmp_path / f"phone{suffix}", muxer, rotation, width=128, height=96)
    displayed = np.rot90(quadrant_frame(0, 96, 128), k=rotation // 90)  # [H, W, 3] as a player shows it
    for cfg in (VideoConfig(num_frames=3, backend=backend),
                VideoConfig(num_frames=3, backend=backend, min_pixels=784, max_pixels=784)):  # downscaled
        clip = load_clip(str(path), cfg)
        assert clip.backend == backend
        assert (clip.height, clip.width) == displayed.shape[:2]
        h, w = clip.frames.shape[1:3]
        assert abs(w / h - displayed.shape[1] / displayed.shape[0]) < 0.05
        assert all(bright_quadrants(f) == bright_quadrants(displayed) for f in clip.frames)


# ---------------------------------------------------------------------------------------------
# FFmpeg's log lines, and real decode errors


def _corrupt_clip(tmp_path: Path) -> Path:
    """An H.264 mp4 with bytes overwritten in its frame data (the index, first, intact): it
    opens, and decoding it fails part way."""
    path = write_counter_clip(tmp_path / "whole.mp4", "mp4", "libx264", 120, FPS, 128, 96, {"crf": "18", "g": "24"},
                              {"movflags": "faststart"})
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    frames_from = data.index(b"mdat") + 1000
    for at in rng.integers(frames_from, len(data) - 100, 40):
        data[at : at + 20] = rng.integers(0, 256, 20, dtype=np.uint8).tobytes()
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(bytes(data))
    return bad


def test_ffmpeg_chatter_stays_out_of_the_log_even_when_pyav_logging_is_on(tmp_path, caplog):
    path = _corrupt_clip(tmp_path)
    caplog.set_level(logging.DEBUG)
    av.logging.set_level(av.logging.VERBOSE)  # as a library that turns PyAV's logging on would
    try:
        with pytest.raises(av.error.FFmpegError), av.open(str(path)) as container:
            container.streams.video[0].thread_count = 1  # logging on and FFmpeg threads can deadlock on close
            for _ in container.decode(video=0):
                pass
        assert any(r.name.startswith("libav") for r in caplog.records), "decoding it makes FFmpeg talk"
        caplog.clear()
        with pytest.raises(VideoError) as e:
            load_clip(str(path), VideoConfig(num_frames=120, backend="pyav"))
        assert av.logging.get_level() == av.logging.VERBOSE, "the level someone chose is left as it was"
    finally:
        av.logging.set_level(None)
    assert not [r for r in caplog.records if r.name.startswith("libav")]
    assert e.value.error_type == "video_unreadable"


def test_a_decode_error_reaches_the_row_with_ffmpegs_error_text(tmp_path, caplog):
    path = _corrupt_clip(tmp_path)
    caplog.set_level(logging.DEBUG)
    assert av.logging.get_level() is None  # PyAV's default: silent
    with pytest.raises(VideoError) as e:
        load_clip(str(path), VideoConfig(num_frames=120, backend="pyav"))
    message = str(e.value)
    assert e.value.error_type == "video_unreadable" and str(path) in message
    assert "cannot be decoded" in message and "Invalid data" in message, message
    assert av.logging.get_level() is None and not [r for r in caplog.records if r.name.startswith("libav")]


def _chattering_clip(tmp_path: Path) -> Path:
    """An H.264 mp4 with 8 bytes overwritten in one frame: FFmpeg conceals the damage and says so
    ("left block unavailable ..."), and every frame still decodes."""
    path = write_counter_clip(tmp_path / "whole.mp4", "mp4", "libx264", 120, FPS, 128, 96, {"crf": "18", "g": "24"},
                              {"movflags": "faststart"})
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    [at] = rng.integers(data.index(b"mdat") + 1000, len(data) - 100, 1)
    data[at : at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
    chatty = tmp_path / "chatty.mp4"
    chatty.write_bytes(bytes(data))
    return chatty


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_a_clip_ffmpeg_chatters_on_decodes_silently(tmp_path, caplog, capfd, backend):
    path = _chattering_clip(tmp_path)
    caplog.set_level(logging.DEBUG)
    av.logging.set_level(av.logging.VERBOSE)  # as a library that turns PyAV's logging on would
    try:
        with av.open(str(path)) as container:
            container.streams.video[0].thread_count = 1  # logging on and FFmpeg threads can deadlock on close
            assert sum(1 for _ in container.decode(video=0)) == 120, "it decodes"
        assert any(r.name.startswith("libav") for r in caplog.records), "and FFmpeg talks while it does"
        caplog.clear()
        capfd.readouterr()
        clip = load_clip(str(path), VideoConfig(num_frames=16, backend=backend))
    finally:
        av.logging.set_level(None)
    assert clip.backend == backend and len(clip.frame_indices) == 16
    assert not [r for r in caplog.records if r.name.startswith("libav")]
    assert capfd.readouterr().err == "", "nothing on fd 2, where decord's C code writes"


def test_decords_ffmpeg_says_nothing_on_stderr(tmp_path, capfd):
    path = _corrupt_clip(tmp_path)
    with pytest.raises(VideoError):
        load_clip(str(path), VideoConfig(num_frames=120, backend="decord"))
    assert "[h264 @" not in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------
# The column


def test_the_backend_column_is_in_the_schema():
    assert OUTPUT_SCHEMA.field("video_backend").type == "string"
    assert VIDEO_BACKENDS == ("decord", "pyav", "pillow")


# ---------------------------------------------------------------------------------------------
# Large S3 objects: ranged reads, never the whole object in memory


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_a_large_s3_video_is_read_in_ranges_or_spooled_to_disk(tmp_path, s3_bucket, monkeypatch, backend):
    path = write_counter_clip(tmp_path / "long.mp4", "mp4", "libx264", 240, FPS, 320, 240,
                              {"crf": "10", "g": "24"}, {"movflags": "faststart"})
    uri = f"s3://{s3_bucket}/videos/long.mp4"
    storage.write_bytes(uri, path.read_bytes())
    monkeypatch.setattr(video, "S3_IN_MEMORY_MAX_BYTES", 0)  # every object counts as large
    monkeypatch.setattr(remote_video, "READ_BUFFER_BYTES", 4096)
    made: list[remote_video.RemoteVideo] = []
    real = remote_video.RemoteVideo.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(remote_video.RemoteVideo, "__init__", spy)
    whole = []
    monkeypatch.setattr(storage, "read_bytes", lambda *a, **k: whole.append(a) or b"")
    clip = load_clip(uri, VideoConfig(num_frames=8, backend=backend))
    local = load_clip(str(path), VideoConfig(num_frames=8, backend=backend))
    assert clip.frame_indices == local.frame_indices and np.array_equal(clip.frames, local.frames)
    assert not whole, "the object was never fetched whole into memory"
    [remote] = made
    assert remote.size == path.stat().st_size
    if backend == "pyav":
        assert remote.counts.largest_get <= 4096 and remote.counts.gets > 1
    assert not list(Path(tempfile.gettempdir()).glob("vreason-video-*")), "the spooled copy is removed"
    auto = load_clip(uri, VideoConfig(num_frames=8, backend="auto"))
    assert auto.backend == "pyav", "auto reads a large S3 object with PyAV (flat memory)"
    assert np.array_equal(auto.frames, local.frames)


def test_an_s3_outage_mid_read_stays_a_storage_error_not_an_error_row(tmp_path, s3_bucket, monkeypatch):
    path = write_counter_clip(tmp_path / "c.mp4", "mp4", "libx264", 48, FPS, 128, 96, {"g": "12"})
    uri = f"s3://{s3_bucket}/videos/c.mp4"
    storage.write_bytes(uri, path.read_bytes())
    monkeypatch.setattr(video, "S3_IN_MEMORY_MAX_BYTES", 0)
    real, calls = storage.s3_read_range, []

    def flaky(*args):
        calls.append(args)
        if len(calls) > 1:  # the head is read, then the store goes away
            raise storage.StorageError(f"{uri}: read failed: connection reset (after retries)")
        return real(*args)

    monkeypatch.setattr(storage, "s3_read_range", flaky)
    with pytest.raises(storage.StorageError):
        load_clip(uri, VideoConfig(num_frames=8, backend="pyav"))
