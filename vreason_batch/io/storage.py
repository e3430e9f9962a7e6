"""Local paths and s3:// URIs behind one set of functions: the package's one door to files and objects.

Both kinds of location go through the same few functions (`read_bytes`, `write_bytes`, `exists`,
`list_files`, `delete_prefix`, `join`), so callers never branch on the scheme. Each function here
parses the URI and hands the work to localfs.py (local paths) or s3.py (boto3 for object calls,
`pyarrow.fs` for Parquet; both honour AWS_ENDPOINT_URL so MinIO / moto work).

Failure policy (failures.py, re-exported here): transient errors (throttling, 5xx, connection
resets, timeouts) are retried with exponential backoff and jitter by `retry`; anything else
(missing key, access denied) is raised at once as a `StorageError` subclass. Credentials are read
by the AWS SDKs from the environment and are never logged or stored here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from vreason_batch.io import localfs, s3

# Callers catch and retry through this module: storage.NotFound, storage.retry, storage.s3_client.
from vreason_batch.io.failures import (
    AccessDenied,
    AlreadyExists,
    NotFound,
    StorageError,
    backoff_delay_s,
    is_transient,
    retry,
    retrying,
)
from vreason_batch.io.s3 import s3_client

# ---------------------------------------------------------------------------------------------
# URIs


def parse_uri(uri: str) -> tuple[str, str | None, str]:
    """`s3://bucket/key` -> ("s3", "bucket", "key"); a local path or file:// URI -> ("file", None, path)."""
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"not a path or URI: {uri!r}")
    if "://" not in uri:
        return "file", None, os.path.expanduser(uri)
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        # Split by hand: urlparse would cut a key at '?' or '#', and S3 keys may contain both.
        bucket, _, key = uri.split("://", 1)[1].partition("/")
        if not bucket:
            raise StorageError(f"s3 URI without a bucket: {uri!r}")
        return "s3", bucket, key
    if scheme == "file":
        return "file", None, parsed.path
    raise StorageError(f"unsupported URI scheme {scheme!r} in {uri!r} (use a local path or s3://)")


def is_s3(uri: str) -> bool:
    return isinstance(uri, str) and uri[:5].lower() == "s3://"


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or s3:// URI ('/'-separated; leading slashes in parts ignored)."""
    clean = [p.strip("/") for p in parts if p and p.strip("/")]
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *clean]) if clean else uri
    return os.path.join(uri, *clean)


def pyarrow_fs(uri: str) -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) for a local path or s3:// URI, e.g. for Parquet IO."""
    import pyarrow.fs as pafs

    scheme, bucket, key = parse_uri(uri)
    if bucket is None:
        return pafs.LocalFileSystem(), os.path.abspath(key)
    return s3.pyarrow_fs(bucket, key)


# ---------------------------------------------------------------------------------------------
# Operations


def read_bytes(uri: str) -> bytes:
    """The whole content of a local file or S3 object. Raises NotFound when it does not exist."""
    scheme, bucket, key = parse_uri(uri)
    if bucket is None:
        return localfs.read_bytes(uri, key)
    return s3.read_bytes(uri, bucket, key)


def s3_object_size(uri: str) -> int:
    """An s3:// object's size in bytes. Raises NotFound when it does not exist."""
    _, bucket, key = parse_uri(uri)
    return s3.object_size(uri, bucket, key)


def s3_read_range(uri: str, start: int, length: int) -> bytes:
    """`length` bytes of an s3:// object from `start` (fewer at its end), in one ranged GET."""
    _, bucket, key = parse_uri(uri)
    return s3.read_range(uri, bucket, key, start, length)


# S3 objects are streamed in ranged GETs of this size; each range is one retried call.
READ_CHUNK_BYTES = 8 * 2**20


def iter_chunks(uri: str, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
    """The content of a local file or S3 object in chunks, so memory does not grow with its size.

    S3: one ranged GET per chunk, each retried on its own, so a connection reset mid-object costs
    one chunk, not the whole read. Raises NotFound when it does not exist.
    """
    scheme, bucket, key = parse_uri(uri)
    if bucket is None:
        yield from localfs.iter_chunks(uri, key, chunk_bytes)
        return
    yield from s3.iter_chunks(uri, bucket, key, chunk_bytes)


def iter_lines(uri: str, keep_ends: bool = False, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
    """The lines of a local file or S3 object, streamed (split on b"\\n"; a final line without one too)."""
    rest = b""
    for chunk in iter_chunks(uri, chunk_bytes):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n" if keep_ends else line
    if rest:
        yield rest


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically: readers see the old content or the new, never a part."""
    scheme, bucket, key = parse_uri(uri)
    if bucket is None:
        localfs.write_bytes(key, data)
        return
    s3.write_bytes(uri, bucket, key, data)


def write_bytes_if_absent(uri: str, data: bytes) -> None:
    """Create a whole file only if nothing is there yet, atomically; raises AlreadyExists otherwise.

    Of several writers racing for one name exactly one succeeds. Local: the content goes to a temp
    file that is then hard-linked to the name (link() fails when the name exists, and readers never
    see a half-written file, unlike O_EXCL + write). S3: PutObject with `If-None-Match: *`.
    """
    scheme, bucket, key = parse_uri(uri)
    if bucket is None:
        localfs.write_bytes_if_absent(uri, key, data)
        return
    s3.write_bytes_if_absent(uri, bucket, key, data)


def exists(uri: str) -> bool:
    """True for an existing file / object, or a directory / S3 prefix holding at least one object."""
    scheme, bucket, key = parse_uri(uri)
    if bucket is None:
        return localfs.exists(key)
    return s3.exists(uri, bucket, key)


def list_files(prefix_or_dir: str, pattern: str = "*") -> list[str]:
    """Files under a local directory, a local glob (`/data/**/*.mp4`) or an s3:// prefix, recursively,
    whose file name matches `pattern` (fnmatch). Sorted full paths / URIs.

    An s3:// prefix is a folder: `s3://b/videos` lists `videos/...`, not `videos2/...`.
    A local directory that does not exist raises NotFound; an empty S3 prefix lists nothing.
    """
    scheme, bucket, key = parse_uri(prefix_or_dir)
    if bucket is not None:
        return s3.list_files(prefix_or_dir, bucket, key, pattern)
    return localfs.list_files(prefix_or_dir, key, pattern)


def delete_prefix(uri: str) -> int:
    """Delete a local file or directory tree, or every object at / under an s3:// prefix.

    Returns the number of files / objects deleted. A prefix that does not exist deletes nothing.
    """
    scheme, bucket, key = parse_uri(uri)
    if bucket is None:
        return localfs.delete_prefix(key)
    return s3.delete_prefix(uri, bucket, key)
