"""A large s3:// video as a seekable file object (ranged GETs), so it is never held whole in memory.

PyAV reads through any file object with read / seek / tell: `RemoteVideo.open()` gives it one that
fetches only the ranges asked for, `READ_BUFFER_BYTES` at a time. decord needs a path or bytes:
`spooled()` streams the object to a temporary file on disk (not RAM) and removes it afterwards.
"""

from __future__ import annotations

import io
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from vreason_batch.io import storage

# Bytes per ranged GET: FFmpeg asks for 32 KiB at a time; one GET per read would be thousands of
# requests per video, a buffer this size makes them few while a read stays small.
READ_BUFFER_BYTES = 2 * 2**20


@dataclass
class ReadCounts:
    """What reading an object cost: ranged GETs made and bytes they returned."""

    gets: int = 0
    bytes_read: int = 0
    largest_get: int = 0


class S3RangeReader(io.RawIOBase):
    """A read-only, seekable raw stream over one s3:// object; each read is one ranged GET."""

    def __init__(self, uri: str, size: int, counts: ReadCounts):
        super().__init__()
        self.uri, self.size, self.counts, self.pos = uri, size, counts, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        # At most one buffer per GET, whatever the caller asks for: memory stays bounded.
        length = min(len(buffer), self.size - self.pos, READ_BUFFER_BYTES)
        if length <= 0:
            return 0
        data = storage.s3_read_range(self.uri, self.pos, length)
        n = len(data)
        buffer[:n] = data
        self.pos += n
        self.counts.gets += 1
        self.counts.bytes_read += n
        self.counts.largest_get = max(self.counts.largest_get, n)
        return n


@dataclass
class RemoteVideo:
    """An s3:// video read in ranges; `counts` adds up the reads of every file object it opened."""

    uri: str
    size: int
    counts: ReadCounts = field(default_factory=ReadCounts)

    def open(self) -> io.BufferedReader:
        """A fresh seekable file object on the object (each container gets its own position)."""
        return io.BufferedReader(S3RangeReader(self.uri, self.size, self.counts), buffer_size=READ_BUFFER_BYTES)

    def head(self, n: int) -> bytes:
        with self.open() as f:
            return f.read(n)

    @contextmanager
    def spooled(self) -> Iterator[str]:
        """The object copied to a temporary file on disk, chunk by chunk; removed on exit."""
        fd, path = tempfile.mkstemp(prefix="vreason-video-", suffix=".bin")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in storage.iter_chunks(self.uri):
                    out.write(chunk)
                    self.counts.bytes_read += len(chunk)
            yield path
        finally:
            os.unlink(path)


VideoSource = str | bytes | RemoteVideo  # what the readers open: a local path, a small object's bytes, a large object
