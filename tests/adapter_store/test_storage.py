"""Both backends through one interface: local directory and a real S3 HTTP endpoint (moto)."""

import boto3
import pytest

from adapter_store.errors import AdapterInvalid, IntegrityError, StorageUnavailable, UriOutsideStorage
from adapter_store.storage import open_storage
from adapter_store.storage_base import blob_key, hash_file

from .servers import free_port


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage((tmp_path / "store").as_uri())
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/pre/fix", endpoint_url=endpoint)


def _corrupt(storage, sha):
    if storage.uri.startswith("file://"):
        path = storage.root / blob_key(sha)
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        storage.client.put_object(Bucket=storage.bucket, Key=storage._key(blob_key(sha)), Body=b"y" * 300_000)


def test_put_get_roundtrip_verified_with_progress(storage, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    sha, size = hash_file(src)
    seen = []
    storage.put_blob(src, sha, size, progress=lambda d, t: seen.append((d, t)))
    storage.verify_blob(sha, size)
    assert seen and seen[-1] == (size, size)
    storage.put_blob(src, sha, size)  # idempotent
    assert storage.stat_blob(sha) == size and storage.stat_blob("0" * 64) is None
    got = []
    storage.get_blob(sha, tmp_path / "out.bin", size=size, progress=lambda d, t: got.append(d))
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes() and got[-1] == size
    assert [b.sha256 for b in storage.list_blobs()] == [sha]
    storage.delete_blob(sha)
    assert storage.stat_blob(sha) is None and list(storage.list_blobs()) == []


def test_corrupt_blob_is_refused_and_leaves_nothing(storage, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 300_000)
    sha, size = hash_file(src)
    storage.put_blob(src, sha, size)
    _corrupt(storage, sha)
    with pytest.raises(IntegrityError, match=sha):
        storage.get_blob(sha, tmp_path / "out.bin", size=size)
    assert not (tmp_path / "out.bin").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_uri_listing_and_confinement(storage, tmp_path):
    if storage.uri.startswith("file://"):
        d = storage.root / "uploads" / "a1"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
        inside = f"{storage.uri}/uploads/a1"
        outside = [(tmp_path / "elsewhere").as_uri(), f"{storage.uri}/../x", "s3://bucket/x", "http://x/y"]
    else:
        storage.client.put_object(Bucket=storage.bucket, Key="pre/fix/uploads/a1/adapter_config.json", Body=b"{}")
        inside = f"{storage.uri}/uploads/a1"
        outside = [f"s3://{storage.bucket}/other/a1", "s3://other-bucket/pre/fix/a1",
                   f"{storage.uri}/../x", f"s3://{storage.bucket}/pre/fixture", (tmp_path / "x").as_uri()]
    assert storage.list_uri(inside) == {"adapter_config.json": 2}
    storage.fetch_uri(inside, "adapter_config.json", tmp_path / "cfg.json")
    assert (tmp_path / "cfg.json").read_text() == "{}"
    for uri in outside:
        with pytest.raises(UriOutsideStorage):
            storage.list_uri(uri)


def test_symlink_out_of_local_storage_is_outside(tmp_path):
    storage = open_storage((tmp_path / "store").as_uri())
    (tmp_path / "secret").mkdir()
    (storage.root / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(UriOutsideStorage):
        storage.list_uri(f"{storage.uri}/link")


def test_unreachable_s3_is_storage_unavailable(tmp_path):
    storage = open_storage("s3://nowhere/x", endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    sha, size = hash_file(src)
    with pytest.raises(StorageUnavailable):
        storage.put_blob(src, sha, size)
    with pytest.raises(StorageUnavailable):
        storage.ping()


def test_s3_uses_standard_credential_chain(s3_endpoint, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-key")
    storage = open_storage(f"s3://{s3_bucket}", endpoint_url=s3_endpoint)
    assert storage.client._request_signer._credentials.access_key == "another-key"
    storage.ping()
    assert boto3.client("s3", endpoint_url=s3_endpoint).head_bucket(Bucket=s3_bucket)


def test_a_key_with_hash_or_question_mark_is_the_directory_it_names(storage, tmp_path):
    """S3 takes the key as written (as the AWS CLI does), so 'team#2' is not 'team'; a file URI
    percent-decodes, so its '#' and '?' must be escaped and unescaped ones are refused."""
    files = {"team/adapter_config.json": b"A" * 3, "team#2/adapter_config.json": b"B" * 5}
    if storage.uri.startswith("file://"):
        for rel, data in files.items():
            (storage.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (storage.root / rel).write_bytes(data)
        named = f"{storage.uri}/team%232"
        for uri in (f"{storage.uri}/team#2", f"{storage.uri}/team?2"):
            with pytest.raises(AdapterInvalid, match="query or fragment") as err:
                storage.list_uri(uri)
            assert err.value.param == "uri"
    else:
        for rel, data in files.items():
            storage.client.put_object(Bucket=storage.bucket, Key=f"pre/fix/{rel}", Body=data)
        named = f"{storage.uri}/team#2"
    assert storage.list_uri(named) == {"adapter_config.json": 5}
    assert storage.list_uri(f"{storage.uri}/team") == {"adapter_config.json": 3}


def test_a_file_gone_since_it_was_listed_is_a_400_on_both_backends(storage, tmp_path):
    if storage.uri.startswith("file://"):
        (storage.root / "up").mkdir()
        (storage.root / "up" / "a.json").write_text("{}")
    else:
        storage.client.put_object(Bucket=storage.bucket, Key="pre/fix/up/a.json", Body=b"{}")
    assert storage.list_uri(f"{storage.uri}/up") == {"a.json": 2}
    with pytest.raises(AdapterInvalid, match="b.json cannot be read") as err:
        storage.fetch_uri(f"{storage.uri}/up", "b.json", tmp_path / "b.json")
    assert err.value.status == 400 and not (tmp_path / "b.json").exists()


def test_an_upload_s3_refuses_is_storage_unavailable(s3_endpoint, tmp_path):
    """upload_file wraps S3's refusal (here: no such bucket) in its own exception type."""
    storage = open_storage("s3://no-such-bucket-molora/x", endpoint_url=s3_endpoint, max_attempts=1)
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    with pytest.raises(StorageUnavailable, match="upload of blob"):
        storage.put_blob(src, *hash_file(src))
