"""Fixtures: a session-wide embedded Valkey and moto S3 server on loopback, and per-test
registries isolated by a fresh Redis key namespace."""

from __future__ import annotations

import os
import uuid

import boto3
import pytest

from adapter_store.blob_cache import BlobCache
from adapter_store.redis_conn import EmbeddedRedis, connect
from adapter_store.registry import Registry, StoreLimits
from adapter_store.storage_local import LocalStorage

from .peft_fixtures import tiny_signature
from .servers import free_port

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def valkey(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("valkey")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    name = f"b-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def namespace():
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def redis_client(valkey):
    client = connect(valkey.url, retries=1, backoff_base_s=0.01, backoff_cap_s=0.05)
    yield client
    client.close()
    client.connection_pool.disconnect()


@pytest.fixture
def signature():
    return tiny_signature()


@pytest.fixture
def limits():
    return StoreLimits(max_adapter_bytes=2 << 20, max_rank=16)


@pytest.fixture
def registry(redis_client, tmp_path, signature, limits, namespace):
    storage = LocalStorage((tmp_path / "storage").as_uri())
    cache = BlobCache(tmp_path / "cache", 64 << 20)
    return Registry(redis_client, storage, cache, signature, limits=limits,
                    staging_dir=tmp_path / "staging", namespace=namespace)
