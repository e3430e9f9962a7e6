"""`vreason-batch bench --workload video`: what each video reader costs, on clips generated here.

Two figures per reader (decord, pyav, and auto, which picks one per file):
- ms per sampled frame: `load_clip` of 16 frames from a 1080p H.264 mp4 and a 720p VP9 webm,
  whole call (open, index, decode, convert to RGB), divided by 16;
- long vs short: 16 frames from a 60-minute clip over 16 frames from a 1-minute clip of the same
  encoding (320x240 H.264, 10 fps, a keyframe every 5 s): a reader that seeks stays near 1x, one
  that decodes its way through grows with the length. PyAV also reports the frames it decoded.

Figures, not a test: every timing is the median of `--repeats` calls after one warm-up call.
The clips go to a temporary directory (the 60-minute one takes a minute or so to encode on two
cores) and are deleted afterwards.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

SAMPLED = 16
BACKENDS = ("decord", "pyav", "auto")


def _pattern(i: int, height: int, width: int) -> np.ndarray:
    """Frame i [H, W, 3] uint8: gradients that move a few pixels a frame, so the encoder has
    motion to code (flat frames would make every decoder look fast)."""
    y = np.arange(height, dtype=np.int32)[:, None]
    x = np.arange(width, dtype=np.int32)[None, :]
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[..., 0] = (x + 3 * i) % 256
    frame[..., 1] = (y + 2 * i) % 256
    frame[..., 2] = ((x + y) // 2 + 5 * i) % 256
    return frame


def write_clip(path: str, fmt: str, codec: str, seconds: float, fps: int, width: int, height: int,
               options: dict[str, str]) -> str:
    """A clip of moving gradients; frames repeat every 64 so that long clips encode quickly."""
    import av

    cycle = [av.VideoFrame.from_ndarray(_pattern(i, height, width), format="rgb24") for i in range(64)]
    with av.open(path, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        for i in range(int(seconds * fps)):
            frame = cycle[i % len(cycle)]
            frame.pts = None
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _time_load(path: str, backend: str, repeats: int) -> tuple[float, dict[str, Any]]:
    """(median seconds of one load_clip of SAMPLED frames, what the last call reported)."""
    from vreason_batch.config import VideoConfig
    from vreason_batch.io import video_pyav
    from vreason_batch.io.video import load_clip

    cfg = VideoConfig(num_frames=SAMPLED, backend=backend)
    info: dict[str, Any] = {}
    load_clip(path, cfg)  # warm-up: imports, page cache
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        clip = load_clip(path, cfg)
        times.append(time.perf_counter() - t0)
    info["backend_used"] = clip.backend
    if clip.backend == "pyav":
        counts: dict[str, int] = {}
        video_pyav.load_pyav(path, path, cfg, counts)
        info.update(counts)
    return statistics.median(times), info


def _speed(workdir: str, repeats: int) -> dict[str, Any]:
    clips = {
        "h264_1080p": write_clip(os.path.join(workdir, "h264_1080p.mp4"), "mp4", "libx264", 10, 30, 1920, 1080,
                                 {"preset": "veryfast", "crf": "23"}),
        "vp9_720p": write_clip(os.path.join(workdir, "vp9_720p.webm"), "webm", "libvpx-vp9", 10, 30, 1280, 720,
                               {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0"}),
    }
    out: dict[str, Any] = {}
    for name, path in clips.items():
        for backend in BACKENDS:
            try:
                seconds, info = _time_load(path, backend, repeats)
            except Exception as e:  # noqa: BLE001 - a reader that cannot read a clip is a figure too
                out[f"{name}_{backend}"] = {"error": f"{type(e).__name__}: {e}"[:200]}
                continue
            out[f"{name}_{backend}"] = {"ms_per_frame": 1000 * seconds / SAMPLED, **info}
    return out


def _seek_ratio(workdir: str, repeats: int, long_minutes: float) -> dict[str, Any]:
    options = {"preset": "ultrafast", "crf": "28", "g": "50"}
    short = write_clip(os.path.join(workdir, "short.mp4"), "mp4", "libx264", 60, 10, 320, 240, options)
    long = write_clip(os.path.join(workdir, "long.mp4"), "mp4", "libx264", 60 * long_minutes, 10, 320, 240, options)
    out: dict[str, Any] = {"long_minutes": long_minutes, "long_bytes": os.path.getsize(long)}
    for backend in ("decord", "pyav", "auto"):
        t_short, _ = _time_load(short, backend, repeats)
        t_long, info = _time_load(long, backend, repeats)
        out[backend] = {"short_ms": 1000 * t_short, "long_ms": 1000 * t_long, "ratio": t_long / t_short, **info}
    return out


def _print(figures: dict[str, Any]) -> None:
    print(f"ms per sampled frame ({SAMPLED} frames a call, median of {figures['repeats']}):")
    for key, row in figures["speed"].items():
        text = row.get("error") or f"{row['ms_per_frame']:8.2f} ms  (read by {row['backend_used']})"
        print(f"  {key:24s} {text}")
    seek = figures["seek"]
    print(f"16 frames from {seek['long_minutes']:g} min over 16 frames from 1 min (same encoding):")
    for backend in ("decord", "pyav", "auto"):
        row = seek[backend]
        decoded = f", {row['decoded']} frames decoded" if "decoded" in row else ""
        print(f"  {backend:8s} {row['short_ms']:8.1f} ms -> {row['long_ms']:8.1f} ms: {row['ratio']:.2f}x{decoded}")


def run_video_bench(args: Any, long_minutes: float = 60.0) -> dict[str, Any]:
    """Both figures (see module docstring); printed, and returned for --json."""
    repeats = max(1, int(getattr(args, "repeats", 3)))
    with tempfile.TemporaryDirectory(prefix="vreason-video-bench-") as workdir:
        figures = {"repeats": repeats, "speed": _speed(workdir, repeats),
                   "seek": _seek_ratio(workdir, repeats, long_minutes)}
    _print(figures)
    return figures
