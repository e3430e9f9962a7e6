"""The frame table of an MP4 / MOV video track from its sample tables (moov), without reading a packet.

An ISO BMFF file lists every sample of a track in its `moov` box: decode durations (stts),
composition offsets (ctts), sync samples (stss), and an edit list (elst) that shifts the
presentation timeline. FFmpeg's mov demuxer derives each packet's timestamps from those, so the
same arithmetic gives the timestamps `index_frames` would collect by demuxing the whole file,
after reading only the `moov` box: a long or remote video is sampled by seeking alone.

Only the plain case is handled: one edit that starts the presentation at a media time >= 0 and
runs to the end (or no edit list), no fragments (`mvex`), every sample presented (no timestamp
before the edit's start). Anything else returns None and the caller demuxes, as before; so does a
table that disagrees with the first packets the demuxer reads (video_pyav checks).
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO

import numpy as np

MAX_MOOV_BYTES = 256 << 20  # a moov larger than this is not read into memory (the caller demuxes)
_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}


def _boxes(buf: bytes, start: int = 0, end: int | None = None):
    """(type, payload start, payload end) of the boxes in buf[start:end]."""
    end = len(buf) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", buf, pos)
        head = 8
        if size == 1:
            size, head = struct.unpack_from(">Q", buf, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            raise ValueError(f"box {kind!r} at {pos} runs past its parent")
        yield kind, pos + head, pos + size
        pos += size


def read_moov(f: BinaryIO) -> bytes | None:
    """The payload of the file's top-level `moov` box (wherever it sits), or None."""
    f.seek(0, 2)
    size_of_file = f.tell()
    pos = 0
    while pos + 8 <= size_of_file:
        f.seek(pos)
        head = f.read(16)
        if len(head) < 8:
            return None
        size, kind = struct.unpack_from(">I4s", head)
        skip = 8
        if size == 1:
            if len(head) < 16:
                return None
            size, skip = struct.unpack_from(">Q", head, 8)[0], 16
        elif size == 0:
            size = size_of_file - pos
        if size < skip:
            return None
        if kind == b"moov":
            if size > MAX_MOOV_BYTES:
                return None
            f.seek(pos + skip)
            body = f.read(size - skip)
            return body if len(body) == size - skip else None
        pos += size
    return None


def _full_box(buf: bytes, start: int) -> tuple[int, int]:
    """(version, payload start after the version/flags word) of a full box."""
    return buf[start], start + 4


def _children(buf: bytes, start: int, end: int) -> dict[bytes, tuple[int, int]]:
    """The first box of each type directly inside buf[start:end]."""
    out: dict[bytes, tuple[int, int]] = {}
    for kind, s, e in _boxes(buf, start, end):
        out.setdefault(kind, (s, e))
    return out


def _run_lengths(buf: bytes, start: int, signed: bool) -> np.ndarray:
    """stts / ctts: (count, value) pairs expanded to one value per sample."""
    n = struct.unpack_from(">I", buf, start)[0]
    pairs = np.frombuffer(buf, dtype=">u4", count=2 * n, offset=start + 4).reshape(n, 2)
    values = pairs[:, 1].astype(np.int64)
    if signed:
        values = pairs[:, 1].view(">i4").astype(np.int64)
    return np.repeat(values, pairs[:, 0].astype(np.int64))


def _track(buf: bytes, trak: tuple[int, int], movie_timescale: int) -> dict[str, Any] | None:
    kids = _children(buf, *trak)
    if b"tkhd" not in kids or b"mdia" not in kids:
        return None
    version, p = _full_box(buf, kids[b"tkhd"][0])
    track_id = struct.unpack_from(">I", buf, p + (16 if version == 1 else 8))[0]
    mdia = _children(buf, *kids[b"mdia"])
    if b"hdlr" not in mdia or b"mdhd" not in mdia or b"minf" not in mdia:
        return None
    handler = buf[mdia[b"hdlr"][0] + 8: mdia[b"hdlr"][0] + 12]
    version, p = _full_box(buf, mdia[b"mdhd"][0])
    timescale = struct.unpack_from(">I", buf, p + (16 if version == 1 else 8))[0]
    minf = _children(buf, *mdia[b"minf"])
    if b"stbl" not in minf:
        return None
    return {"id": track_id, "handler": handler, "timescale": timescale, "stbl": _children(buf, *minf[b"stbl"]),
            "edts": _children(buf, *kids[b"edts"]) if b"edts" in kids else {}, "movie_timescale": movie_timescale}


def _edit_shift(buf: bytes, track: dict[str, Any], last_end: int) -> int | None:
    """The media time the presentation starts at (subtracted from every timestamp), or None if not plain."""
    if b"elst" not in track["edts"]:
        return 0
    version, p = _full_box(buf, track["edts"][b"elst"][0])
    n = struct.unpack_from(">I", buf, p)[0]
    if n != 1:
        return None
    if version == 1:
        duration, media_time = struct.unpack_from(">Qq", buf, p + 4)
        rate = struct.unpack_from(">i", buf, p + 20)[0]
    else:
        duration, media_time = struct.unpack_from(">Ii", buf, p + 4)
        rate = struct.unpack_from(">i", buf, p + 12)[0]
    if media_time < 0 or rate != 1 << 16:
        return None
    # the edit must run to the last frame's end (a shorter one hides frames at the end), give or
    # take the one tick of the movie's timescale its duration is rounded to
    ts, movie_ts = track["timescale"], track["movie_timescale"]
    if duration and (duration + 1) * ts < (last_end - media_time) * movie_ts:
        return None
    return media_time


def frame_table_arrays(moov: bytes, track_id: int) -> dict[str, Any] | None:
    """pts (sorted), keyframe pts and dts, count and time base of video track `track_id`, or None."""
    top = _children(moov, 0, len(moov))
    if b"mvex" in top or b"mvhd" not in top:
        return None  # fragmented: the samples are listed in moof boxes, not here
    version, p = _full_box(moov, top[b"mvhd"][0])
    movie_timescale = struct.unpack_from(">I", moov, p + (16 if version == 1 else 8))[0]
    traks = [(s, e) for kind, s, e in _boxes(moov) if kind == b"trak"]
    tracks = [t for t in (_track(moov, tr, movie_timescale) for tr in traks) if t is not None and t["id"] == track_id]
    if len(tracks) != 1 or tracks[0]["handler"] != b"vide":
        return None
    t = tracks[0]
    stbl = t["stbl"]
    if b"stts" not in stbl or b"stsz" not in stbl:
        return None
    count = struct.unpack_from(">I", moov, stbl[b"stsz"][0] + 8)[0]
    deltas = _run_lengths(moov, stbl[b"stts"][0] + 4, signed=False)
    if len(deltas) != count or count == 0:
        return None
    dts = np.concatenate([[0], np.cumsum(deltas[:-1])])
    offsets = np.zeros(count, dtype=np.int64)
    if b"ctts" in stbl:
        version, p = _full_box(moov, stbl[b"ctts"][0])
        offsets = _run_lengths(moov, p, signed=version == 1)
        if len(offsets) != count or (offsets < 0).any():
            return None  # negative composition offsets: FFmpeg shifts dts too; not this path's
    pts = dts + offsets
    shift = _edit_shift(moov, t, int(pts.max() + deltas[-1]))
    if shift is None or (pts - shift < 0).any():
        return None
    pts, dts = pts - shift, dts - shift
    if len(np.unique(pts)) != count:
        return None
    sync = np.arange(count)
    if b"stss" in stbl:
        n = struct.unpack_from(">I", moov, stbl[b"stss"][0] + 4)[0]
        sync = np.frombuffer(moov, dtype=">u4", count=n, offset=stbl[b"stss"][0] + 8).astype(np.int64) - 1
        if n == 0 or sync.min() < 0 or sync.max() >= count:
            return None
    return {"pts": np.sort(pts).tolist(), "count": count, "timescale": t["timescale"],
            "keyframe_dts": {int(pts[i]): int(dts[i]) for i in sync}}
