"""The S3 half of storage: boto3 clients, pyarrow's S3 filesystem, and each operation on s3:// URIs.

Called by storage.py with a URI already split into bucket and key; the URI itself is passed on for
messages. Every call goes through `_s3_call`: retried on transient errors, and what is left becomes
a StorageError (NotFound, AccessDenied). boto3 and `pyarrow.fs` both honour AWS_ENDPOINT_URL, so
MinIO / moto work. Credentials are read by the AWS SDKs from the environment and are never logged
or stored here.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlparse

import botocore.exceptions

from vreason_batch.io.failures import AccessDenied, AlreadyExists, NotFound, StorageError, describe, retry

T = TypeVar("T")

DEFAULT_REGION = "us-east-1"


# ---------------------------------------------------------------------------------------------
# Clients

# One boto3 client per process and endpoint settings. Keyed by pid so a forked worker builds its
# own (a client's connection pool must not cross a fork); never stored on objects Ray pickles.
_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def _endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


def s3_client() -> Any:
    """The process's boto3 S3 client for the current environment (endpoint, region, credentials)."""
    endpoint = _endpoint_url()
    region = _region()
    # The access key id is part of the key only so that changed credentials get a new client.
    key = (
        os.getpid(),
        endpoint,
        region,
        os.environ.get("AWS_PROFILE"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
    )
    client = _clients.get(key)
    if client is not None:
        return client
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _make_client(endpoint, region)
            _clients[key] = client
    return client


def _make_client(endpoint: str | None, region: str) -> Any:
    try:
        import boto3
        from botocore.config import Config as BotoConfig
    except ImportError as e:  # pragma: no cover - boto3 is a hard dependency
        raise ImportError("S3 access needs boto3: pip install boto3") from e
    boto_config = BotoConfig(
        region_name=region,
        # `retry` is the one retry layer; botocore's own retries would multiply with it.
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=32,
        # S3-compatible stores (MinIO, Ceph, moto) behind a custom endpoint rarely have
        # wildcard DNS for virtual-hosted buckets.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    # A fresh session: the default session is not thread-safe to build clients from.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint, config=boto_config)


def pyarrow_fs(bucket: str, key: str) -> tuple[Any, str]:
    """(pyarrow S3FileSystem, path inside it) for an object or prefix, e.g. for Parquet IO."""
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {"region": _region()}
    endpoint = _endpoint_url()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    # Credentials come from the SDK's default chain (environment, profile, instance role).
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


# ---------------------------------------------------------------------------------------------
# Operations


def _s3_call(fn: Callable[[], T], uri: str, what: str) -> T:
    """Run one S3 operation with retries; translate what is left into a StorageError."""
    try:
        return retry(fn, what=f"{what} {uri}")
    except botocore.exceptions.ClientError as e:
        err = e.response.get("Error", {})
        code = str(err.get("Code"))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound") or status == 404:
            raise NotFound(f"{uri}: not found ({code})") from e
        if code in ("AccessDenied", "403", "Forbidden") or status == 403:
            raise AccessDenied(f"{uri}: access denied ({what})") from e
        raise StorageError(f"{uri}: {what} failed: {describe(e)}") from e
    except botocore.exceptions.BotoCoreError as e:
        raise StorageError(f"{uri}: {what} failed: {describe(e)}") from e


def read_bytes(uri: str, bucket: str, key: str) -> bytes:
    def get() -> bytes:
        # The body is read inside the retried call: a connection reset mid-body retries too.
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()

    return _s3_call(get, uri, "read")


def object_size(uri: str, bucket: str, key: str) -> int:
    """The object's size in bytes (a HEAD request)."""
    return int(_s3_call(lambda: s3_client().head_object(Bucket=bucket, Key=key), uri, "head")["ContentLength"])


def read_range(uri: str, bucket: str, key: str, start: int, length: int) -> bytes:
    """`length` bytes from `start` (fewer at the object's end): one ranged GET, retried."""
    rng = f"bytes={start}-{start + length - 1}"
    return _s3_call(lambda: s3_client().get_object(Bucket=bucket, Key=key, Range=rng)["Body"].read(), uri, "read")


def iter_chunks(uri: str, bucket: str, key: str, chunk_bytes: int) -> Iterator[bytes]:
    """One ranged GET per chunk, each retried on its own, so a connection reset mid-object costs
    one chunk, not the whole read."""
    size = _s3_call(lambda: s3_client().head_object(Bucket=bucket, Key=key), uri, "head")["ContentLength"]
    for start in range(0, size, chunk_bytes):
        rng = f"bytes={start}-{min(size, start + chunk_bytes) - 1}"
        yield _s3_call(lambda r=rng: s3_client().get_object(Bucket=bucket, Key=key, Range=r)["Body"].read(), uri, "read")


def write_bytes(uri: str, bucket: str, key: str, data: bytes) -> None:
    # A single PutObject is atomic for the whole object.
    _s3_call(lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data), uri, "write")


# S3 answers a conditional write that lost with 412; 409 when another conditional write on the
# same key is still in flight (the loser of a race).
_CONDITION_FAILED = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})


def write_bytes_if_absent(uri: str, bucket: str, key: str, data: bytes) -> None:
    """PutObject with `If-None-Match: *`; raises AlreadyExists when the object is there."""

    def put() -> None:
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except botocore.exceptions.ClientError as e:
            err = e.response.get("Error", {})
            status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
            if str(err.get("Code")) in _CONDITION_FAILED or status in _CONDITION_FAILED:
                raise AlreadyExists(f"{uri}: already exists") from None
            raise

    _s3_call(put, uri, "create")


# ListObjectsV2 returns at most 1000 keys per page; a module constant so tests can page with less.
_LIST_PAGE_SIZE = 1000


def _s3_dir_prefix(key: str) -> str:
    return key if not key or key.endswith("/") else key + "/"


def _iter_s3_keys(bucket: str, prefix: str, uri: str) -> list[str]:
    keys: list[str] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": _LIST_PAGE_SIZE}
        if token:
            kwargs["ContinuationToken"] = token
        page = _s3_call(lambda kw=kwargs: s3_client().list_objects_v2(**kw), uri, "list")
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def exists(uri: str, bucket: str, key: str) -> bool:
    """An object at `key`, or at least one object under the prefix `key/`; False without the bucket."""
    if key and not key.endswith("/") and _is_object(bucket, key, uri):
        return True
    prefix = _s3_dir_prefix(key)
    try:
        page = _s3_call(lambda: s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1), uri, "list")
    except NotFound:  # no such bucket
        return False
    return page.get("KeyCount", 0) > 0


def _is_object(bucket: str, key: str, uri: str) -> bool:
    try:
        _s3_call(lambda: s3_client().head_object(Bucket=bucket, Key=key), uri, "head")
    except NotFound:
        return False
    return True


def list_files(uri: str, bucket: str, key: str, pattern: str) -> list[str]:
    """Sorted URIs of the objects under the folder `key` (`videos` lists `videos/...`, not
    `videos2/...`) whose file name matches `pattern`; an empty prefix lists nothing."""
    keys = _iter_s3_keys(bucket, _s3_dir_prefix(key), uri)
    return sorted(
        f"s3://{bucket}/{k}"
        for k in keys
        if not k.endswith("/") and fnmatch.fnmatch(posixpath.basename(k), pattern)
    )


def delete_prefix(uri: str, bucket: str, key: str) -> int:
    """Delete the object `key` and every object under the folder `key/`; never a whole bucket."""
    if not key:
        raise StorageError(f"refusing to delete a whole bucket: {uri}")
    keys = _iter_s3_keys(bucket, _s3_dir_prefix(key), uri)
    if not key.endswith("/") and _is_object(bucket, key, uri):
        keys.append(key)
    for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        batch = {"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True}
        resp = _s3_call(lambda b=batch: s3_client().delete_objects(Bucket=bucket, Delete=b), uri, "delete")
        if resp.get("Errors"):
            first = resp["Errors"][0]
            raise StorageError(
                f"{uri}: could not delete {len(resp['Errors'])} objects, e.g. {first.get('Key')}: {first.get('Code')}"
            )
    return len(keys)
