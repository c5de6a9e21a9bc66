import pytest

from adapter_store.blob_cache import BlobCache
from adapter_store.errors import IntegrityError
from adapter_store.manifest import FileEntry, content_id
from adapter_store.storage import open_storage
from adapter_store.storage_base import blob_key, hash_file


def _artifact(storage, tmp_path, tag: str, size: int) -> tuple[str, list[FileEntry]]:
    src = tmp_path / f"{tag}.bin"
    src.write_bytes(tag.encode() * (size // len(tag)))
    sha, n = hash_file(src)
    storage.put_blob(src, sha, n)
    files = [FileEntry(path="adapter_model.safetensors", sha256=sha, size=n)]
    return content_id(files), files


def test_miss_then_hit_and_lru_eviction(tmp_path):
    storage = open_storage((tmp_path / "s").as_uri())
    cache = BlobCache(tmp_path / "c", max_bytes=250_000)
    arts = [_artifact(storage, tmp_path, t, 100_000) for t in ("aa", "bb", "cc")]
    p0 = cache.materialize(storage, *arts[0])
    assert (p0 / "adapter_model.safetensors").stat().st_size == 100_000
    cache.materialize(storage, *arts[1])
    cache.materialize(storage, *arts[0])  # touch: aa is now the most recent
    progress = []
    cache.materialize(storage, *arts[2], progress=lambda d, t: progress.append((d, t)))
    assert progress[-1] == (100_000, 100_000)
    held = {p.name for _, _, p in cache.entries()}
    assert held == {arts[0][0], arts[2][0]} and cache.size() <= 250_000


def test_corrupt_cache_entry_is_fetched_again(tmp_path):
    storage = open_storage((tmp_path / "s").as_uri())
    cache = BlobCache(tmp_path / "c", max_bytes=10 << 20)
    cid, files = _artifact(storage, tmp_path, "zz", 50_000)
    path = cache.materialize(storage, cid, files) / "adapter_model.safetensors"
    path.write_bytes(b"q" * 50_000)
    assert hash_file(cache.materialize(storage, cid, files) / "adapter_model.safetensors")[0] == files[0].sha256


def test_corrupt_storage_fails_and_caches_nothing(tmp_path):
    storage = open_storage((tmp_path / "s").as_uri())
    cache = BlobCache(tmp_path / "c", max_bytes=10 << 20)
    cid, files = _artifact(storage, tmp_path, "zz", 50_000)
    (storage.root / blob_key(files[0].sha256)).write_bytes(b"q" * 50_000)
    with pytest.raises(IntegrityError):
        cache.materialize(storage, cid, files)
    assert list((tmp_path / "c").iterdir()) == []
