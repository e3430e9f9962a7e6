"""Memory figures of the video readers (issue 19), printed, not asserted: run as a script.

  python -m vreason_batch.bench.video_memory rss [--decodes 1000]
      RSS of this process every 100 `load_clip` calls per backend, on small generated clips.
  python -m vreason_batch.bench.video_memory s3 [--mb 300]
      A large generated clip on a moto S3 server (its own process, so its memory is not counted):
      bytes fetched from S3 over the object's size, and peak RSS of one decode in a fresh process,
      for a small and a large object of the same encoding, both read the large-object way.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss(decodes: int) -> None:
    from vreason_batch.bench.video import write_clip
    from vreason_batch.config import VideoConfig
    from vreason_batch.io.video import load_clip

    with tempfile.TemporaryDirectory() as work:
        clips = [write_clip(os.path.join(work, f"c{i}.mp4"), "mp4", "libx264", 3, 10, 160 + 16 * i, 120,
                            {"preset": "ultrafast", "g": "10"}) for i in range(5)]
        for backend in ("decord", "pyav"):
            cfg = VideoConfig(num_frames=16, backend=backend)
            marks = []
            for n in range(1, decodes + 1):
                load_clip(clips[n % len(clips)], cfg)
                if n % 100 == 0:
                    marks.append(_rss_mb())
            print(f"{backend}: RSS MB every 100 decodes: {' '.join(f'{m:.1f}' for m in marks)}"
                  f"  (growth 100->{decodes}: {marks[-1] - marks[0]:+.1f} MB)", flush=True)


def _noise_clip(path: str, mb: float) -> str:
    """Lossless H.264 of noise frames (64 of them, cycled) until the file is about `mb` MB."""
    import av

    rng = np.random.default_rng(0)
    cycle = [av.VideoFrame.from_ndarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), format="rgb24")
             for _ in range(64)]
    with av.open(path, "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.options = {"preset": "ultrafast", "qp": "0", "g": "50"}
        i = 0
        while i < 200 or i * 150_000 < mb * 2**20:  # ~150 kB a frame, measured
            frame = cycle[i % 64]
            frame.pts = None
            container.mux(stream.encode(frame))
            i += 1
        container.mux(stream.encode())
    return path


_CHILD = """
import json, resource, sys
from vreason_batch.config import VideoConfig
from vreason_batch.io import remote_video, video
made = []
init = remote_video.RemoteVideo.__init__
def spy(self, *a, **k):
    init(self, *a, **k); made.append(self)
remote_video.RemoteVideo.__init__ = spy
video.S3_IN_MEMORY_MAX_BYTES = 0  # the small object too goes the large-object way, to compare
clip = video.load_clip(sys.argv[1], VideoConfig(num_frames=16, backend=sys.argv[2]))
counts = made[0].counts
print(json.dumps({"bytes_read": counts.bytes_read, "gets": counts.gets,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "backend": clip.backend}))
"""


def s3(mb: float) -> None:
    import json

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as work:
            for size_mb in (mb / 10, mb):
                path = _noise_clip(os.path.join(work, f"noise{size_mb:.0f}.mp4"), size_mb)
                key = os.path.basename(path)
                client.upload_file(path, "bench", key)
                size = os.path.getsize(path)
                for backend in ("pyav", "decord"):
                    out = subprocess.run([sys.executable, "-c", _CHILD, f"s3://bench/{key}", backend], env=env,
                                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                    fig = json.loads(out)
                    read = fig["bytes_read"]
                    print(f"{size / 2**20:8.1f} MB object, {backend:6s}: fetched {read / size:.2f}x its size"
                          f" in {fig['gets']} ranged GETs (decord: one spool), peak RSS {fig['peak_rss_mb']:.0f} MB",
                          flush=True)
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("rss").add_argument("--decodes", type=int, default=1000)
    sub.add_parser("s3").add_argument("--mb", type=float, default=300)
    args = parser.parse_args()
    rss(args.decodes) if args.what == "rss" else s3(args.mb)


if __name__ == "__main__":
    main()
