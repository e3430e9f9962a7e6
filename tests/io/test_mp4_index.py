"""The MP4 / MOV frame table read from the sample tables equals the one demuxing the whole file gives,
and every case it does not handle (or gets wrong) falls back to demuxing, with the right frames."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from videos import counter_frame, encoder_available, frame_index, write_counter_clip

from vreason_batch.config import VideoConfig
from vreason_batch.io import mp4_index, video_pyav
from vreason_batch.io.video_probe import open_container

av = pytest.importorskip("av")

H264_B = {"crf": "12", "bf": "3", "g": "12", "x264-params": "scenecut=0"}
CLIPS = {  # name: (file, muxer, encoder, codec options, container options)
    "mp4-h264-bframes": ("c.mp4", "mp4", "libx264", H264_B, None),
    "mov-h264": ("c.mov", "mov", "libx264", {"g": "10"}, None),
    "mp4-faststart": ("f.mp4", "mp4", "libx264", H264_B, {"movflags": "faststart"}),
    "mp4-mpeg4": ("m.mp4", "mp4", "mpeg4", {"bf": "2", "g": "12"}, None),
    "mp4-hevc": ("h.mp4", "mp4", "libx265", {"x265-params": "log-level=none:keyint=12"}, None),
}


def _tables(path):
    with open_container(av, str(path)) as c:
        fast = video_pyav.index_from_moov(av, c, c.streams.video[0], str(path))
    with open_container(av, str(path)) as c:
        slow = video_pyav.index_frames(c, c.streams.video[0])
    return fast, slow


def _vfr_clip(path, container_options=None):
    """40 frames at irregular intervals (33, 50, 17, 100 ms), B-frames: a variable frame rate."""
    with av.open(str(path), "w", format="mp4", options=container_options or {}) as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt, s.time_base = 64, 48, "yuv420p", Fraction(1, 1000)
        s.options = {"bf": "2", "crf": "12"}
        t = 0
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(counter_frame(i, 48, 64), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            t += (33, 50, 17, 100)[i % 4]
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return path


def _frames_right(path, n=7):
    clip = video_pyav.load_pyav(str(path), str(path), VideoConfig(num_frames=n))
    assert [frame_index(f) for f in clip.frames] == clip.frame_indices
    return clip


@pytest.mark.parametrize("name", list(CLIPS))
def test_the_sample_tables_give_the_demuxers_frame_table(tmp_path, name):
    file, muxer, encoder, options, container_options = CLIPS[name]
    if not encoder_available(encoder):
        pytest.skip(f"no {encoder} in this PyAV build")
    path = write_counter_clip(tmp_path / file, muxer, encoder, 60, 10, 64, 48, options, container_options)
    fast, slow = _tables(path)
    assert fast is not None
    assert (fast.pts, fast.count, fast.keyframes, fast.keyframe_dts) == (slow.pts, slow.count, slow.keyframes, slow.keyframe_dts)
    _frames_right(path)


def test_a_variable_frame_rate_clip_and_its_faststart_copy(tmp_path):
    for path in (_vfr_clip(tmp_path / "vfr.mp4"), _vfr_clip(tmp_path / "fs.mp4", {"movflags": "faststart"})):
        fast, slow = _tables(path)
        assert fast is not None and fast.pts == slow.pts and fast.keyframes == slow.keyframes
        assert len(set(np.diff(fast.pts))) > 1  # irregular
        _frames_right(path)


def test_fragmented_mp4_and_other_containers_are_demuxed(tmp_path):
    frag = _vfr_clip(tmp_path / "frag.mp4", {"movflags": "frag_keyframe+empty_moov"})
    mkv = write_counter_clip(tmp_path / "c.mkv", "matroska", "libx264", 30, 10, 64, 48, H264_B)
    for path in (frag, mkv):
        fast, slow = _tables(path)
        assert fast is None and slow.count in (30, 40)
        _frames_right(path)


def test_a_table_that_disagrees_with_the_first_packets_is_not_used(tmp_path, monkeypatch):
    path = write_counter_clip(tmp_path / "c.mp4", "mp4", "libx264", 60, 10, 64, 48, H264_B)
    real = mp4_index.frame_table_arrays

    def one_frame_late(moov, track_id):  # every timestamp shifted by one frame: same spacing, wrong start
        found = real(moov, track_id)
        step = found["pts"][1] - found["pts"][0]
        found["pts"] = [p + step for p in found["pts"]]
        found["keyframe_dts"] = {p + step: d for p, d in found["keyframe_dts"].items()}
        return found

    monkeypatch.setattr(mp4_index, "frame_table_arrays", one_frame_late)
    assert _tables(path)[0] is None
    _frames_right(path)


def test_a_long_mp4_is_sampled_without_demuxing_it(tmp_path, monkeypatch):
    path = write_counter_clip(tmp_path / "long.mp4", "mp4", "libx264", 240, 10, 64, 48, {**H264_B, "g": "24"})

    def whole_demux(*args):
        raise AssertionError("the whole file was demuxed for its frame table")

    monkeypatch.setattr(video_pyav, "index_frames", whole_demux)
    counts: dict[str, int] = {}
    clip = video_pyav.load_pyav(str(path), str(path), VideoConfig(num_frames=4), counts)
    assert [frame_index(f) for f in clip.frames] == clip.frame_indices and clip.frame_indices[-1] == 239
    assert counts["decoded"] <= 4 * 30 and counts["restarts"] == 0, counts


def test_moov_found_after_the_media_and_boxes_that_lie_are_refused():
    def box(kind: bytes, payload: bytes) -> bytes:
        return (8 + len(payload)).to_bytes(4, "big") + kind + payload

    import io

    data = box(b"ftyp", b"isom" + bytes(4)) + box(b"mdat", bytes(1000)) + box(b"moov", box(b"mvhd", bytes(100)))
    assert mp4_index.read_moov(io.BytesIO(data)) == box(b"mvhd", bytes(100))
    assert mp4_index.read_moov(io.BytesIO(box(b"ftyp", bytes(8)) + box(b"mdat", bytes(10)))) is None
    assert mp4_index.frame_table_arrays(box(b"mvhd", bytes(100)), 1) is None  # no track
    with pytest.raises(ValueError, match="runs past"):
        list(mp4_index._boxes((100).to_bytes(4, "big") + b"trak"))
