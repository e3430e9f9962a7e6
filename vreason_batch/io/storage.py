"""Local paths and s3:// URIs: the only module that touches object storage.

Both kinds of location go through the same few functions (`read_bytes`, `write_bytes`, `exists`,
`list_files`, `delete_prefix`, `join`), so callers never branch on the scheme. S3 is reached with
boto3 (object calls) and `pyarrow.fs` (Parquet); both honour AWS_ENDPOINT_URL so MinIO / moto work.

Failure policy: transient errors (throttling, 5xx, connection resets, timeouts) are retried with
exponential backoff and jitter by `retry`; anything else (missing key, access denied) is raised at
once as a `StorageError` subclass. Credentials are read by the AWS SDKs from the environment and
are never logged or stored here.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import logging
import os
import posixpath
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlparse

import botocore.exceptions

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_REGION = "us-east-1"


class StorageError(OSError):
    """A storage operation that failed for a reason retrying will not fix."""


class NotFound(StorageError, FileNotFoundError):
    """The file, object or bucket does not exist."""


class AccessDenied(StorageError, PermissionError):
    """The credentials in use may not do this (HTTP 403)."""


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


# ---------------------------------------------------------------------------------------------
# Retries

# Error codes S3 (and S3-compatible stores) return for overload / server trouble.
TRANSIENT_ERROR_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "500",
        "502",
        "503",
        "504",
    }
)
TRANSIENT_HTTP_STATUS = frozenset({429, 500, 502, 503, 504})
# pyarrow's S3 filesystem raises OSError("AWS Error <TYPE> during <op> operation: ...").
_PYARROW_TRANSIENT_MARKERS = (
    "SLOW_DOWN",
    "THROTTLING",
    "REQUEST_LIMIT_EXCEEDED",
    "SERVICE_UNAVAILABLE",
    "INTERNAL_FAILURE",
    "NETWORK_CONNECTION",
    "REQUEST_TIMEOUT",
    "HTTP status 500",
    "HTTP status 503",
    "Connection reset",
)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: throttling, 5xx, dropped connections and timeouts."""
    if isinstance(exc, StorageError):
        return False
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return err.get("Code") in TRANSIENT_ERROR_CODES or status in TRANSIENT_HTTP_STATUS
    if isinstance(
        exc,
        (
            botocore.exceptions.ConnectionError,  # endpoint unreachable, connect timeout
            botocore.exceptions.HTTPClientError,  # connection closed, read timeout, body stream broke
            botocore.exceptions.IncompleteReadError,
        ),
    ):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):  # builtins: reset, aborted, refused, broken pipe
        return True
    if isinstance(exc, OSError) and "AWS Error" in str(exc):
        return any(marker in str(exc) for marker in _PYARROW_TRANSIENT_MARKERS)
    return False


def backoff_delay_s(attempt: int, base_delay_s: float, max_delay_s: float) -> float:
    """Delay before retry number `attempt` (0-based): exponential, capped, with "equal jitter".

    Half the delay is fixed and half random, so many workers throttled at once spread out
    without any of them hammering the store again immediately.
    """
    cap = min(max_delay_s, base_delay_s * (2**attempt))
    return cap / 2 + random.uniform(0, cap / 2)


def retry(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay_s: float = 0.5,
    max_delay_s: float = 20.0,
    transient: Callable[[BaseException], bool] = is_transient,
    what: str = "",
    sleep: Callable[[float], Any] | None = None,
) -> T:
    """Call `fn()`; on a transient error wait and call again, up to `attempts` calls in total.

    A non-transient error, or the last transient one, is re-raised unchanged. `sleep` defaults
    to time.sleep (tests pass a recorder).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts - 1 or not transient(exc):
                raise
            delay = backoff_delay_s(attempt, base_delay_s, max_delay_s)
            log.warning(
                "transient storage error%s (attempt %d/%d), retrying in %.2fs: %s",
                f" on {what}" if what else "",
                attempt + 1,
                attempts,
                delay,
                _describe(exc),
            )
            (sleep or time.sleep)(delay)
    raise AssertionError("unreachable")


def retrying(**retry_kwargs: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator form of `retry`: `@retrying(attempts=3)`."""

    def decorate(func: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            return retry(lambda: func(*args, **kwargs), **retry_kwargs)

        return wrapper

    return decorate


def _describe(exc: BaseException) -> str:
    """A one-line description of an error: the S3 code and status, never request headers."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{err.get('Code')} (HTTP {status}): {err.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


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


def pyarrow_fs(uri: str) -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) for a local path or s3:// URI, e.g. for Parquet IO."""
    import pyarrow.fs as pafs

    scheme, bucket, key = parse_uri(uri)
    if bucket is None:
        return pafs.LocalFileSystem(), os.path.abspath(key)
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
        raise StorageError(f"{uri}: {what} failed: {_describe(e)}") from e
    except botocore.exceptions.BotoCoreError as e:
        raise StorageError(f"{uri}: {what} failed: {_describe(e)}") from e


def _open_local(uri: str, path: str):
    """A local file opened for reading, its failures mapped to this module's errors."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise NotFound(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise StorageError(f"{uri}: is a directory, not a file") from None
    except PermissionError:
        raise AccessDenied(f"{uri}: permission denied") from None


def read_bytes(uri: str) -> bytes:
    """The whole content of a local file or S3 object. Raises NotFound when it does not exist."""
    scheme, bucket, key = parse_uri(uri)
    if bucket is None:
        with _open_local(uri, key) as f:
            return f.read()

    def get() -> bytes:
        # The body is read inside the retried call: a connection reset mid-body retries too.
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()

    return _s3_call(get, uri, "read")


# S3 objects are streamed in ranged GETs of this size; each range is one retried call.
READ_CHUNK_BYTES = 8 * 2**20


def iter_chunks(uri: str, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
    """The content of a local file or S3 object in chunks, so memory does not grow with its size.

    S3: one ranged GET per chunk, each retried on its own, so a connection reset mid-object costs
    one chunk, not the whole read. Raises NotFound when it does not exist.
    """
    scheme, bucket, key = parse_uri(uri)
    if bucket is None:
        with _open_local(uri, key) as f:
            while chunk := f.read(chunk_bytes):
                yield chunk
        return
    size = _s3_call(lambda: s3_client().head_object(Bucket=bucket, Key=key), uri, "head")["ContentLength"]
    for start in range(0, size, chunk_bytes):
        rng = f"bytes={start}-{min(size, start + chunk_bytes) - 1}"
        yield _s3_call(lambda r=rng: s3_client().get_object(Bucket=bucket, Key=key, Range=r)["Body"].read(), uri, "read")


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
        directory = os.path.dirname(os.path.abspath(key))
        os.makedirs(directory, exist_ok=True)
        # Not tempfile.mkstemp: its 0600 mode would survive the rename; 0666 lets the umask decide.
        tmp = os.path.join(directory, f".{os.path.basename(key)}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, key)
        except BaseException:
            # Leave no half-written temp file behind, whatever interrupted the write.
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    # A single PutObject is atomic for the whole object.
    _s3_call(lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data), uri, "write")


class AlreadyExists(StorageError, FileExistsError):
    """A create-if-absent write found the file or object already there."""


# S3 answers a conditional write that lost with 412; 409 when another conditional write on the
# same key is still in flight (the loser of a race).
_CONDITION_FAILED = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})


def write_bytes_if_absent(uri: str, data: bytes) -> None:
    """Create a whole file only if nothing is there yet, atomically; raises AlreadyExists otherwise.

    Of several writers racing for one name exactly one succeeds. Local: the content goes to a temp
    file that is then hard-linked to the name (link() fails when the name exists, and readers never
    see a half-written file, unlike O_EXCL + write). S3: PutObject with `If-None-Match: *`.
    """
    scheme, bucket, key = parse_uri(uri)
    if bucket is None:
        directory = os.path.dirname(os.path.abspath(key))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(key)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, key)
        except FileExistsError:
            raise AlreadyExists(f"{uri}: already exists") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return

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


def exists(uri: str) -> bool:
    """True for an existing file / object, or a directory / S3 prefix holding at least one object."""
    scheme, bucket, key = parse_uri(uri)
    if bucket is None:
        return os.path.exists(key)
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


def list_files(prefix_or_dir: str, pattern: str = "*") -> list[str]:
    """Files under a local directory, a local glob (`/data/**/*.mp4`) or an s3:// prefix, recursively,
    whose file name matches `pattern` (fnmatch). Sorted full paths / URIs.

    An s3:// prefix is a folder: `s3://b/videos` lists `videos/...`, not `videos2/...`.
    A local directory that does not exist raises NotFound; an empty S3 prefix lists nothing.
    """
    scheme, bucket, key = parse_uri(prefix_or_dir)
    if bucket is not None:
        keys = _iter_s3_keys(bucket, _s3_dir_prefix(key), prefix_or_dir)
        return sorted(
            f"s3://{bucket}/{k}"
            for k in keys
            if not k.endswith("/") and fnmatch.fnmatch(posixpath.basename(k), pattern)
        )
    if glob.has_magic(key):
        candidates = glob.glob(key, recursive=True)
    elif os.path.isdir(key):
        candidates = [os.path.join(root, name) for root, _, names in os.walk(key) for name in names]
    elif os.path.exists(key):
        raise StorageError(f"{prefix_or_dir}: is a file, not a directory")
    else:
        raise NotFound(f"{prefix_or_dir}: no such directory")
    return sorted(p for p in candidates if os.path.isfile(p) and fnmatch.fnmatch(os.path.basename(p), pattern))


def delete_prefix(uri: str) -> int:
    """Delete a local file or directory tree, or every object at / under an s3:// prefix.

    Returns the number of files / objects deleted. A prefix that does not exist deletes nothing.
    """
    scheme, bucket, key = parse_uri(uri)
    if bucket is None:
        if os.path.isdir(key):
            count = sum(len(names) for _, _, names in os.walk(key))
            shutil.rmtree(key)
            return count
        if os.path.exists(key):
            os.remove(key)
            return 1
        return 0
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
