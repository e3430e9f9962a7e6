"""video: frame sampling checked on pixel content, real mp4s, S3 through moto, every bad-video kind."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from videos import (
    counter_video_bytes,
    frame_index,
    real_video,
    remux_faststart,
    write_counter_video,
    write_empty,
    write_mp4_header_then_garbage,
    write_random_bytes,
    write_text_as_mp4,
    write_truncated,
)

from vreason_batch.io import storage
from vreason_batch.config import VideoConfig
from vreason_batch.io.video import VideoError, decode_size, load_clip, sample_indices, sniff_container


def cfg(**kwargs) -> VideoConfig:
    return VideoConfig(**kwargs)


@pytest.fixture(scope="module")
def counter30(tmp_path_factory) -> Path:
    """30 frames at 10 fps (3 s), 64x48."""
    return write_counter_video(tmp_path_factory.mktemp("videos") / "counter30.mp4", num_frames=30, fps=10)


def decoded_indices(frames: np.ndarray) -> list[int]:
    return [frame_index(f) for f in frames]


# ---------------------------------------------------------------------------------------------
# Pure helpers


def test_sample_indices_uniform_like_qwen():
    # np.linspace(0, 29, 8).round(): first and last frame, evenly spaced, no repeats.
    assert sample_indices(30, 10.0, cfg(num_frames=8)) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert sample_indices(30, 10.0, cfg(num_frames=1)) == [0]
    assert sample_indices(30, 10.0, cfg(num_frames=30)) == list(range(30))
    assert sample_indices(5, 10.0, cfg(num_frames=16)) == [0, 1, 2, 3, 4]


def test_sample_indices_target_fps():
    assert sample_indices(30, 10.0, cfg(target_fps=2.0)) == [0, 6, 12, 17, 23, 29]  # 3 s * 2 fps
    assert sample_indices(30, 10.0, cfg(target_fps=10.0, max_frames=4)) == [0, 10, 19, 29]
    assert sample_indices(30, 10.0, cfg(target_fps=0.01)) == [0]  # at least one frame
    assert sample_indices(30, 10.0, cfg(target_fps=100.0, max_frames=512)) == list(range(30))


@pytest.mark.parametrize("total", [1, 2, 7, 31, 1000])
@pytest.mark.parametrize("wanted", [1, 2, 8, 32])
def test_sample_indices_invariants(total, wanted):
    idx = sample_indices(total, 25.0, cfg(num_frames=wanted))
    assert len(idx) == min(total, wanted)
    assert idx == sorted(set(idx)) and idx[0] == 0 and 0 <= idx[-1] <= total - 1
    if wanted > 1 and total > 1:
        assert idx[-1] == total - 1


def test_decode_size_keeps_aspect_within_budget():
    assert decode_size(48, 64, max_pixels=28 * 28) is None  # 3072 <= 4 * 784
    h, w = decode_size(720, 1280, max_pixels=50176)
    assert h * w <= 4 * 50176 and h % 2 == 0 and w % 2 == 0
    assert abs(w / h - 1280 / 720) < 0.01
    h, w = decode_size(100_000, 10, max_pixels=784)  # extreme aspect: no side collapses to 0
    assert h >= 2 and w >= 2


def test_sniff_container():
    assert sniff_container(counter_video_bytes(num_frames=2)[:256]) == "mp4/mov"
    assert sniff_container(b"\x1a\x45\xdf\xa3" + b"\x00" * 20) == "matroska/webm"
    assert sniff_container(b"RIFF\x00\x00\x00\x00AVI LIST") == "avi"
    assert sniff_container(b"") is None
    assert sniff_container(b"hello world, not a video") is None
    assert sniff_container(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20) is None


# ---------------------------------------------------------------------------------------------
# Sampling on real decoded frames


def test_uniform_sampling_picks_the_expected_frames(counter30):
    clip = load_clip(str(counter30), cfg(num_frames=8))
    assert clip.frame_indices == [0, 4, 8, 12, 17, 21, 25, 29]
    assert decoded_indices(clip.frames) == clip.frame_indices  # the pixels say which frame it is
    assert clip.frames.shape == (8, 48, 64, 3) and clip.frames.dtype == np.uint8
    assert (clip.height, clip.width, clip.frame_height, clip.frame_width) == (48, 64, 48, 64)
    assert clip.num_frames == 30
    assert clip.video_fps == pytest.approx(10.0)
    assert clip.duration_s == pytest.approx(3.0)
    assert clip.sampled_fps == pytest.approx(8 / 3.0)


def test_target_fps_sampling(counter30):
    clip = load_clip(str(counter30), cfg(target_fps=2.0))
    assert clip.frame_indices == [0, 6, 12, 17, 23, 29]
    assert decoded_indices(clip.frames) == clip.frame_indices
    assert clip.sampled_fps == pytest.approx(2.0)
    capped = load_clip(str(counter30), cfg(target_fps=10.0, max_frames=4))
    assert decoded_indices(capped.frames) == [0, 10, 19, 29]
    assert capped.sampled_fps == pytest.approx(4 / 3.0)  # the rate actually seen, after the cap


def test_short_video_gives_all_frames_once(tmp_path):
    path = write_counter_video(tmp_path / "short.mp4", num_frames=5, fps=10)
    clip = load_clip(str(path), cfg(num_frames=16))
    assert clip.frame_indices == [0, 1, 2, 3, 4]
    assert decoded_indices(clip.frames) == [0, 1, 2, 3, 4]


def test_sampling_is_deterministic(counter30):
    a = load_clip(str(counter30), cfg(num_frames=7))
    b = load_clip(f"file://{counter30}", cfg(num_frames=7))
    assert a.frame_indices == b.frame_indices
    assert np.array_equal(a.frames, b.frames)


def test_frames_are_numpy_even_with_decords_torch_bridge(counter30):
    decord = pytest.importorskip("decord")
    pytest.importorskip("torch")
    decord.bridge.set_bridge("torch")  # process-wide; some libraries switch it
    try:
        clip = load_clip(str(counter30), cfg(num_frames=3))
    finally:
        decord.bridge.set_bridge("native")
    assert isinstance(clip.frames, np.ndarray) and clip.frames.dtype == np.uint8
    assert decoded_indices(clip.frames) == [0, 14, 29]


@pytest.mark.parametrize(
    "name, frames, fps, size",
    [
        ("bigbuckbunny.mp4", 132, 25.0, (720, 1280)),
        ("bikes.mp4", 250, 25.0, (272, 640)),
        ("carphone_pristine.mp4", 120, 29.97, (144, 176)),
    ],
)
def test_real_videos(name, frames, fps, size):
    clip = load_clip(str(real_video(name)), cfg(num_frames=8))
    assert clip.num_frames == frames and clip.video_fps == pytest.approx(fps, abs=0.01)
    assert (clip.height, clip.width) == size
    assert clip.frames.shape == (8, *size, 3)  # default max_pixels: all of these fit, no resize
    assert clip.frame_indices[0] == 0 and clip.frame_indices[-1] == frames - 1
    assert clip.frames.std() > 5  # real picture content, not a blank decode


def test_large_source_is_downscaled_while_decoding():
    clip = load_clip(str(real_video("bigbuckbunny.mp4")), cfg(num_frames=4, min_pixels=784, max_pixels=50176))
    assert (clip.height, clip.width) == (720, 1280)  # the source size is still reported
    assert clip.frame_height * clip.frame_width <= 4 * 50176
    assert abs(clip.frame_width / clip.frame_height - 1280 / 720) < 0.01


def test_downscaled_counter_frames_still_match(tmp_path):
    path = write_counter_video(tmp_path / "big.mp4", num_frames=12, width=256, height=192)
    clip = load_clip(str(path), cfg(num_frames=4, min_pixels=784, max_pixels=784))
    assert clip.frame_height * clip.frame_width <= 4 * 784
    assert decoded_indices(clip.frames) == clip.frame_indices == [0, 4, 7, 11]


# ---------------------------------------------------------------------------------------------
# S3 and temp files


def test_s3_video_matches_local_and_leaves_no_temp_files(counter30, s3_bucket, tmp_path, monkeypatch):
    uri = f"s3://{s3_bucket}/videos/counter30.mp4"
    storage.write_bytes(uri, counter30.read_bytes())
    # A private temp dir for this test: anything written to "the" temp dir would show up here.
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    before = set(os.listdir(tempfile.gettempdir()))
    clip = load_clip(uri, cfg(num_frames=8))
    with pytest.raises(VideoError):
        load_clip(f"s3://{s3_bucket}/videos/missing.mp4", cfg())
    assert set(os.listdir(tempfile.gettempdir())) == before == set()
    local = load_clip(str(counter30), cfg(num_frames=8))
    assert clip.frame_indices == local.frame_indices
    assert np.array_equal(clip.frames, local.frames)


def test_s3_missing_and_empty(s3_bucket):
    with pytest.raises(VideoError) as e:
        load_clip(f"s3://{s3_bucket}/nope.mp4", cfg())
    assert e.value.error_type == "video_not_found" and f"s3://{s3_bucket}/nope.mp4" in str(e.value)
    storage.write_bytes(f"s3://{s3_bucket}/empty.mp4", b"")
    with pytest.raises(VideoError) as e:
        load_clip(f"s3://{s3_bucket}/empty.mp4", cfg())
    assert e.value.error_type == "video_empty"


# ---------------------------------------------------------------------------------------------
# Bad videos


def _error(uri: str, config: VideoConfig | None = None) -> VideoError:
    with pytest.raises(VideoError) as e:
        load_clip(uri, config or cfg())
    assert uri in str(e.value), "the message must name the video"
    return e.value


def test_missing_local_file_and_directory(tmp_path):
    assert _error(str(tmp_path / "missing.mp4")).error_type == "video_not_found"
    err = _error(str(tmp_path))
    assert err.error_type == "video_not_found" and "directory" in str(err)


def test_empty_file(tmp_path):
    err = _error(str(write_empty(tmp_path / "empty.mp4")))
    assert err.error_type == "video_empty" and "0 bytes" in str(err)


@pytest.mark.parametrize(
    "make",
    [
        lambda d: write_random_bytes(d / "random.mp4"),
        lambda d: write_text_as_mp4(d / "text.mp4"),
        lambda d: write_mp4_header_then_garbage(d / "garbage.mp4"),
        lambda d: write_truncated(real_video("bigbuckbunny.mp4"), d / "half.mp4", 0.5),
        lambda d: write_truncated(remux_faststart(real_video("bikes.mp4"), d / "fs.mp4"), d / "fs_half.mp4", 0.5),
    ],
    ids=["random-bytes", "text", "mp4-header-then-garbage", "truncated", "truncated-faststart"],
)
def test_unreadable(tmp_path, make):
    err = _error(str(make(tmp_path)))
    assert err.error_type == "video_unreadable"


def test_too_large_source(counter30):
    err = _error(str(counter30), cfg(max_source_pixels=64 * 48 - 1))
    assert err.error_type == "video_too_large" and "64x48" in str(err)
    assert load_clip(str(counter30), cfg(max_source_pixels=64 * 48)).num_frames == 30


def test_video_error_survives_pickling():
    err = pickle.loads(pickle.dumps(VideoError("video_empty", "video x.mp4: the file is empty")))
    assert (err.error_type, str(err)) == ("video_empty", "video x.mp4: the file is empty")
    with pytest.raises(ValueError, match="unknown error_type"):
        VideoError("not_a_type", "x")


TRUNCATION_SWEEP = textwrap.dedent(
    """
    import json, sys
    from vreason_batch.config import VideoConfig
    from vreason_batch.io.video import VideoError, load_clip

    results = {}
    for path in sys.argv[1:]:
        try:
            clip = load_clip(path, VideoConfig(num_frames=8))
            results[path] = "ok"
        except VideoError as e:
            results[path] = e.error_type
    print(json.dumps(results))
    """
)


def test_truncated_files_raise_rather_than_crash(tmp_path):
    """Every cut of a real mp4 (index at the end, or first) is a VideoError, never a crash or hang.

    Run in a child process so that a segfault or hang in decord fails this test instead of
    taking the whole test session down.
    """
    sources = {
        "moov-last": real_video("carphone_pristine.mp4"),
        "moov-first": remux_faststart(real_video("carphone_pristine.mp4"), tmp_path / "fs.mp4"),
        "counter-moov-first": write_counter_video(tmp_path / "c.mp4", num_frames=40, faststart=True),
    }
    paths = []
    for label, src in sources.items():
        for fraction in (0.001, 0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98, 0.999):
            paths.append(str(write_truncated(src, tmp_path / f"{label}-{fraction}.mp4", fraction)))
    proc = subprocess.run([sys.executable, "-c", TRUNCATION_SWEEP, *paths], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"decoding truncated files crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(paths)
    bad = {p: r for p, r in results.items() if r != "video_unreadable"}
    assert not bad, f"truncated files not reported as video_unreadable: {bad}"


# ---------------------------------------------------------------------------------------------
# Image files: read as a one-frame still video


def _write_image(path: Path, fmt: str, width: int = 40, height: int = 30) -> np.ndarray:
    from PIL import Image

    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[: height // 2, :, 0] = 200  # top half red, bottom half blue: orientation and channel order
    rgb[height // 2 :, :, 2] = 180
    Image.fromarray(rgb).save(path, format=fmt)
    return rgb


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp")])
def test_image_is_a_one_frame_still_video(tmp_path, fmt, suffix):
    rgb = _write_image(tmp_path / f"img{suffix}", fmt)
    clip = load_clip(str(tmp_path / f"img{suffix}"), cfg())
    assert clip.media_type == "image_as_video"
    assert clip.frames.shape == (1, 30, 40, 3) and clip.frames.dtype == np.uint8
    tolerance = 0 if fmt == "PNG" else 12  # lossy codecs move the levels a little
    assert np.abs(clip.frames[0].astype(int) - rgb.astype(int)).mean() <= tolerance
    assert clip.frame_indices == [0] and (clip.height, clip.width) == (30, 40)
    fields = clip.row_fields()
    assert fields["media_type"] == "image_as_video" and fields["frame_indices"] == [0]
    assert fields["video_fps"] is None and fields["video_duration_s"] is None


def test_video_row_fields_say_video(counter30):
    fields = load_clip(str(counter30), cfg(num_frames=4)).row_fields()
    assert fields["media_type"] == "video" and fields["video_fps"] == pytest.approx(10.0)
    assert fields["video_duration_s"] == pytest.approx(3.0) and len(fields["frame_indices"]) == 4


def test_image_named_like_a_video_and_video_named_like_an_image(tmp_path, counter30):
    # the bytes decide, not the extension
    _write_image(tmp_path / "still.mp4", "PNG")
    assert load_clip(str(tmp_path / "still.mp4"), cfg()).media_type == "image_as_video"
    (tmp_path / "clip.jpg").write_bytes(counter30.read_bytes())
    assert load_clip(str(tmp_path / "clip.jpg"), cfg(num_frames=2)).media_type == "video"


def test_large_image_is_downscaled_and_too_large_is_rejected(tmp_path):
    _write_image(tmp_path / "big.png", "PNG", width=400, height=300)
    clip = load_clip(str(tmp_path / "big.png"), cfg(min_pixels=28 * 28, max_pixels=28 * 28 * 10))
    h, w = clip.frames.shape[1:3]
    assert h * w <= 4 * 28 * 28 * 10 and abs(w / h - 4 / 3) < 0.05  # DECODE_PIXELS_HEADROOM x budget
    err = _error(str(tmp_path / "big.png"), cfg(max_source_pixels=400 * 300 - 1))
    assert err.error_type == "video_too_large" and "400x300" in str(err)


def test_neither_video_nor_image_and_broken_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("plain text, not a picture\n" * 20)
    err = _error(str(tmp_path / "notes.jpg"))
    assert err.error_type == "video_unreadable" and "neither a recognised video container nor an image" in str(err)
    _write_image(tmp_path / "whole.png", "PNG", width=200, height=150)
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    err = _error(str(tmp_path / "cut.png"))
    assert err.error_type == "video_unreadable" and "cannot be decoded" in str(err)


def test_image_from_s3(tmp_path, s3_bucket):
    _write_image(tmp_path / "img.png", "PNG")
    uri = f"s3://{s3_bucket}/images/img.png"
    storage.write_bytes(uri, (tmp_path / "img.png").read_bytes())
    assert load_clip(uri, cfg()).frames.shape == (1, 30, 40, 3)
