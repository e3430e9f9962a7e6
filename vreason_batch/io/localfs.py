"""The local half of storage: each operation on a local path, with OS errors mapped to StorageError.

Called by storage.py with the path taken out of a local path or file:// URI; the URI as the
caller wrote it is passed on for messages.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import shutil
import uuid
from collections.abc import Iterator

from vreason_batch.io.failures import AccessDenied, AlreadyExists, NotFound, StorageError


def _open_local(uri: str, path: str):
    """A local file opened for reading, its failures mapped to storage's errors."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise NotFound(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise StorageError(f"{uri}: is a directory, not a file") from None
    except PermissionError:
        raise AccessDenied(f"{uri}: permission denied") from None


def read_bytes(uri: str, path: str) -> bytes:
    with _open_local(uri, path) as f:
        return f.read()


def iter_chunks(uri: str, path: str, chunk_bytes: int) -> Iterator[bytes]:
    with _open_local(uri, path) as f:
        while chunk := f.read(chunk_bytes):
            yield chunk


def write_bytes(path: str, data: bytes) -> None:
    """A temp file next to `path`, renamed over it: readers see the old content or the new."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Not tempfile.mkstemp: its 0600 mode would survive the rename; 0666 lets the umask decide.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave no half-written temp file behind, whatever interrupted the write.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes_if_absent(uri: str, path: str, data: bytes) -> None:
    """The content goes to a temp file that is then hard-linked to the name: link() fails when the
    name exists, and readers never see a half-written file, unlike O_EXCL + write."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        raise AlreadyExists(f"{uri}: already exists") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def exists(path: str) -> bool:
    return os.path.exists(path)


def list_files(uri: str, path: str, pattern: str) -> list[str]:
    """Sorted files under a directory or matching a glob (`/data/**/*.mp4`), recursively, whose file
    name matches `pattern`. A directory that does not exist raises NotFound."""
    if glob.has_magic(path):
        candidates = glob.glob(path, recursive=True)
    elif os.path.isdir(path):
        candidates = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    elif os.path.exists(path):
        raise StorageError(f"{uri}: is a file, not a directory")
    else:
        raise NotFound(f"{uri}: no such directory")
    return sorted(p for p in candidates if os.path.isfile(p) and fnmatch.fnmatch(os.path.basename(p), pattern))


def delete_prefix(path: str) -> int:
    """Delete a file or a directory tree; the number of files deleted (0 when nothing is there)."""
    if os.path.isdir(path):
        count = sum(len(names) for _, _, names in os.walk(path))
        shutil.rmtree(path)
        return count
    if os.path.exists(path):
        os.remove(path)
        return 1
    return 0
