"""Shared fixtures: a real moto S3 server over HTTP (no mock decorators) and fresh buckets."""

from __future__ import annotations

import uuid

import pytest

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    # No instance-metadata lookups: they would wait for a timeout on machines outside EC2.
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Anything that could route the tests to a real account or another endpoint.
UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on a free localhost port; AWS_* env points at it for the session.

    Yields the endpoint URL. The environment is restored when the session ends.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = pytest.MonkeyPatch()
    try:
        for name in UNSET:
            env.delenv(name, raising=False)
        for name, value in FAKE_CREDENTIALS.items():
            env.setenv(name, value)
        # Keep ~/.aws files out of the way: they could carry a profile or another endpoint.
        empty = tmp_path_factory.mktemp("aws")
        env.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        yield endpoint
    finally:
        env.undo()
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A new, empty bucket on the moto server; yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name
