"""storage (and its localfs, s3, failures parts): URIs, local and S3 (moto server) round trips,
atomic writes, listing, retries."""

from __future__ import annotations

import multiprocessing
import os
import pickle

import botocore.exceptions
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vreason_batch.io import failures, localfs, s3, storage


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": f"fake {code}"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


class Flaky:
    """A callable that raises the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: BaseException):
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


# ---------------------------------------------------------------------------------------------
# URIs


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://bucket/a/b.mp4", ("s3", "bucket", "a/b.mp4")),
        ("s3://bucket", ("s3", "bucket", "")),
        ("s3://bucket/", ("s3", "bucket", "")),
        ("s3://bucket/odd?name#1.mp4", ("s3", "bucket", "odd?name#1.mp4")),
        ("S3://bucket/k", ("s3", "bucket", "k")),
        ("relative/x.mp4", ("file", None, "relative/x.mp4")),
        ("/abs/x.mp4", ("file", None, "/abs/x.mp4")),
        ("file:///abs/x.mp4", ("file", None, "/abs/x.mp4")),
    ],
)
def test_parse_uri(uri, expected):
    assert storage.parse_uri(uri) == expected


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://host/x.mp4", "s3://", "s3:///key", ""])
def test_parse_uri_rejects(uri):
    with pytest.raises(storage.StorageError):
        storage.parse_uri(uri)


def test_is_s3_and_join():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/s3") and not storage.is_s3("b/s3://")
    assert storage.join("s3://b/out/", "/shard-1/", "part.parquet") == "s3://b/out/shard-1/part.parquet"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("/data/out", "a", "b.txt") == "/data/out/a/b.txt"


# ---------------------------------------------------------------------------------------------
# Local


def test_local_write_read_overwrite_leaves_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "dir" / "marker.json"
    storage.write_bytes(str(target), b"first")
    storage.write_bytes(str(target), b"second")
    assert storage.read_bytes(str(target)) == b"second"
    assert os.listdir(target.parent) == ["marker.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # like open(), not a private temp file


def test_local_write_interrupted_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "data.bin"
    storage.write_bytes(str(target), b"old")

    def fail_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(localfs.os, "replace", fail_replace)
    with pytest.raises(OSError, match="disk went away"):
        storage.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_local_missing_is_not_found(tmp_path):
    with pytest.raises(storage.NotFound, match="no such file"):
        storage.read_bytes(str(tmp_path / "nope.mp4"))
    # NotFound is also the builtin, for callers that only know FileNotFoundError.
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "nope.mp4"))
    with pytest.raises(storage.StorageError, match="is a directory"):
        storage.read_bytes(str(tmp_path))


def _make_tree(root):
    for rel in ["a.mp4", "sub/b.mp4", "sub/deeper/c.MP4", "sub/notes.txt", "d.mp4.part"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_local_list_files_recursive_pattern_and_glob(tmp_path):
    _make_tree(tmp_path)
    assert storage.list_files(str(tmp_path), "*.mp4") == [str(tmp_path / "a.mp4"), str(tmp_path / "sub/b.mp4")]
    assert len(storage.list_files(str(tmp_path))) == 5
    assert storage.list_files(str(tmp_path / "sub" / "**" / "*"), "*.MP4") == [str(tmp_path / "sub/deeper/c.MP4")]
    with pytest.raises(storage.NotFound):
        storage.list_files(str(tmp_path / "missing"))
    with pytest.raises(storage.StorageError, match="not a directory"):
        storage.list_files(str(tmp_path / "a.mp4"))


def test_local_exists_and_delete_prefix(tmp_path):
    _make_tree(tmp_path)
    assert storage.exists(str(tmp_path / "sub")) and storage.exists(str(tmp_path / "a.mp4"))
    assert storage.delete_prefix(str(tmp_path / "sub")) == 3
    assert not storage.exists(str(tmp_path / "sub"))
    assert storage.delete_prefix(str(tmp_path / "a.mp4")) == 1
    assert storage.delete_prefix(str(tmp_path / "never")) == 0
    assert sorted(os.listdir(tmp_path)) == ["d.mp4.part"]


def test_pyarrow_fs_local_round_trip(tmp_path):
    fs, path = storage.pyarrow_fs(str(tmp_path / "t.parquet"))
    pq.write_table(pa.table({"x": [1, 2]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).column("x").to_pylist() == [1, 2]


# ---------------------------------------------------------------------------------------------
# S3 through the moto server


def test_s3_round_trip(s3_bucket):
    uri = f"s3://{s3_bucket}/runs/a/marker.json"
    assert not storage.exists(uri)
    storage.write_bytes(uri, b'{"done": true}')
    assert storage.exists(uri)
    assert storage.exists(f"s3://{s3_bucket}/runs/a")  # a "folder" with objects under it
    assert not storage.exists(f"s3://{s3_bucket}/runs/ab")
    assert storage.read_bytes(uri) == b'{"done": true}'
    storage.write_bytes(uri, b"overwritten")
    assert storage.read_bytes(uri) == b"overwritten"


def test_s3_missing_key_and_bucket_are_not_found(s3_bucket):
    with pytest.raises(storage.NotFound, match="NoSuchKey"):
        storage.read_bytes(f"s3://{s3_bucket}/missing.mp4")
    with pytest.raises(storage.NotFound):
        storage.read_bytes("s3://no-such-bucket-here/x.mp4")
    assert not storage.exists("s3://no-such-bucket-here/x.mp4")


def test_s3_list_files_pages_and_matches_folder_only(s3_bucket, monkeypatch):
    for key in ["v/a.mp4", "v/sub/b.mp4", "v/sub/c.txt", "v/z.mp4", "v2/other.mp4"]:
        storage.write_bytes(f"s3://{s3_bucket}/{key}", b"x")
    monkeypatch.setattr(s3, "_LIST_PAGE_SIZE", 2)  # force several pages
    assert storage.list_files(f"s3://{s3_bucket}/v", "*.mp4") == [
        f"s3://{s3_bucket}/v/a.mp4",
        f"s3://{s3_bucket}/v/sub/b.mp4",
        f"s3://{s3_bucket}/v/z.mp4",
    ]
    assert len(storage.list_files(f"s3://{s3_bucket}/")) == 5
    assert storage.list_files(f"s3://{s3_bucket}/nothing-here") == []


def test_s3_delete_prefix_only_touches_that_folder(s3_bucket, monkeypatch):
    for key in ["out", "out/a", "out/b/c", "out2/keep", "keep"]:
        storage.write_bytes(f"s3://{s3_bucket}/{key}", b"x")
    monkeypatch.setattr(s3, "_LIST_PAGE_SIZE", 2)
    assert storage.delete_prefix(f"s3://{s3_bucket}/out") == 3
    assert storage.list_files(f"s3://{s3_bucket}") == [f"s3://{s3_bucket}/keep", f"s3://{s3_bucket}/out2/keep"]
    with pytest.raises(storage.StorageError, match="whole bucket"):
        storage.delete_prefix(f"s3://{s3_bucket}")


def test_pyarrow_fs_s3_round_trip(s3_bucket):
    fs, path = storage.pyarrow_fs(f"s3://{s3_bucket}/out/part-0.parquet")
    assert path == f"{s3_bucket}/out/part-0.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), path, filesystem=fs)
    # Written through pyarrow, read through boto3: both reach the same endpoint.
    data = storage.read_bytes(f"s3://{s3_bucket}/out/part-0.parquet")
    assert pq.read_table(pa.BufferReader(data)).column("x").to_pylist() == [1, 2, 3]


def test_s3_client_is_cached_per_process_and_endpoint(s3_server, monkeypatch):
    client = storage.s3_client()
    assert storage.s3_client() is client
    assert client.meta.endpoint_url == s3_server
    real_pid = os.getpid()
    monkeypatch.setattr(s3.os, "getpid", lambda: real_pid + 100000)
    assert storage.s3_client() is not client  # a forked child builds its own


def _read_in_child(uri, queue):
    queue.put(storage.read_bytes(uri))


def test_s3_works_in_a_forked_worker_after_the_parent_used_it(s3_bucket):
    uri = f"s3://{s3_bucket}/fork.txt"
    storage.write_bytes(uri, b"from parent")  # the parent now has a cached client
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(uri, queue))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == b"from parent"


def test_storage_functions_pickle_without_clients(s3_bucket):
    storage.write_bytes(f"s3://{s3_bucket}/x", b"x")  # make sure a client exists
    # Ray pickles functions by reference; nothing here drags a client along.
    assert len(pickle.dumps(storage.read_bytes)) < 200
    assert pickle.loads(pickle.dumps(storage.NotFound("s3://b/k: not found"))).args == ("s3://b/k: not found",)


# ---------------------------------------------------------------------------------------------
# Retries


@pytest.mark.parametrize(
    "error",
    [
        client_error("SlowDown", 503),
        client_error("Throttling", 400),
        client_error("RequestLimitExceeded", 400),
        client_error("InternalError", 500),
        client_error("Whatever", 503),
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        botocore.exceptions.ConnectionClosedError(endpoint_url="http://127.0.0.1:1"),
        ConnectionResetError(104, "Connection reset by peer"),
        OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate."),
    ],
)
def test_retry_retries_transient_errors(error):
    sleeps: list[float] = []
    fn = Flaky(error, error)
    assert storage.retry(fn, attempts=3, base_delay_s=0.1, sleep=sleeps.append) == "ok"
    assert fn.calls == 3
    assert len(sleeps) == 2
    # Equal jitter: each delay lies in [cap/2, cap] with cap doubling per attempt.
    assert 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2


@pytest.mark.parametrize(
    "error",
    [
        client_error("NoSuchKey", 404),
        client_error("404", 404),
        client_error("AccessDenied", 403),
        OSError("AWS Error ACCESS_DENIED during HeadObject operation"),
        ValueError("a bug, not the network"),
        storage.NotFound("s3://b/k: not found"),
    ],
)
def test_retry_does_not_retry_permanent_errors(error):
    sleeps: list[float] = []
    fn = Flaky(error)
    with pytest.raises(type(error)):
        storage.retry(fn, attempts=5, sleep=sleeps.append)
    assert fn.calls == 1 and sleeps == []


def test_retry_gives_up_after_attempts_with_the_last_error():
    fn = Flaky(*[client_error("SlowDown", 503) for _ in range(10)])
    with pytest.raises(botocore.exceptions.ClientError, match="SlowDown"):
        storage.retry(fn, attempts=4, sleep=lambda s: None)
    assert fn.calls == 4


def test_retrying_decorator():
    fn = Flaky(client_error("SlowDown", 503))

    @storage.retrying(attempts=2, sleep=lambda s: None)
    def call(suffix):
        return fn() + suffix

    assert call("!") == "ok!"
    assert fn.calls == 2


def test_backoff_is_capped():
    for attempt in range(20):
        assert storage.backoff_delay_s(attempt, base_delay_s=0.5, max_delay_s=4.0) <= 4.0


def test_s3_errors_become_storage_errors_after_retries(monkeypatch):
    monkeypatch.setattr(failures.time, "sleep", lambda s: None)
    with pytest.raises(storage.AccessDenied, match="access denied"):
        s3._s3_call(Flaky(client_error("AccessDenied", 403)), "s3://b/k", "read")
    with pytest.raises(storage.NotFound):
        s3._s3_call(Flaky(client_error("NoSuchBucket", 404)), "s3://b/k", "read")
    fn = Flaky(client_error("SlowDown", 503))
    assert s3._s3_call(fn, "s3://b/k", "read") == "ok" and fn.calls == 2


# ---------------------------------------------------------------------------------------------
# Streaming reads and create-if-absent writes


@pytest.mark.parametrize("where", ["local", "s3"])
def test_iter_lines_across_chunks(where, tmp_path, request):
    data = b"first\n\nsecond line\r\n" + b"x" * 50 + b"\nno newline at the end"
    uri = str(tmp_path / "f.txt") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/f.txt"
    storage.write_bytes(uri, data)
    for chunk in (1, 7, 64, storage.READ_CHUNK_BYTES):
        assert list(storage.iter_lines(uri, chunk_bytes=chunk)) == data.split(b"\n"), chunk
        assert b"".join(storage.iter_lines(uri, keep_ends=True, chunk_bytes=chunk)) == data, chunk
    assert b"".join(storage.iter_chunks(uri, 5)) == data
    with pytest.raises(storage.NotFound):
        list(storage.iter_lines(uri + ".missing"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_bytes_if_absent_only_once(where, tmp_path, request):
    uri = str(tmp_path / "d" / "lock.json") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/d/lock.json"
    storage.write_bytes_if_absent(uri, b"first")
    with pytest.raises(storage.AlreadyExists):
        storage.write_bytes_if_absent(uri, b"second")
    assert storage.read_bytes(uri) == b"first"
    if where == "local":
        assert os.listdir(tmp_path / "d") == ["lock.json"]  # no temp file left behind


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_bytes_if_absent_race_has_one_winner(where, tmp_path, request):
    """Eight threads create the same name at once: exactly one succeeds, its content stays."""
    import threading

    base = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}"
    uri = storage.join(base, "race.json")
    start, winners, losers = threading.Barrier(8), [], []

    def attempt(i):
        start.wait()
        try:
            storage.write_bytes_if_absent(uri, f"writer {i}".encode())
            winners.append(i)
        except storage.AlreadyExists:
            losers.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 7
    assert storage.read_bytes(uri) == f"writer {winners[0]}".encode()
