import io
import tarfile
import zipfile

import pytest

from adapter_store.archive import extract_archive
from adapter_store.errors import AdapterInvalid, AdapterTooLarge, UnsafeArchive


def _tar(path, members: dict[str, bytes], mode="w:gz", links=()):
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return path


def test_tar_is_flattened(tmp_path):
    arc = _tar(tmp_path / "a.tar.gz", {"adapter/adapter_config.json": b"{}", "adapter/x.safetensors": b"12"})
    names = extract_archive(arc, tmp_path / "out", max_bytes=1000)
    assert sorted(names) == ["adapter_config.json", "x.safetensors"]
    assert (tmp_path / "out" / "x.safetensors").read_bytes() == b"12"


def test_zip(tmp_path):
    arc = tmp_path / "a.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("d/adapter_config.json", "{}")
    assert extract_archive(arc, tmp_path / "out", max_bytes=1000) == ["adapter_config.json"]


@pytest.mark.parametrize("name", ["../evil.json", "a/../../evil.json", "/etc/evil.json"])
def test_path_traversal_refused(tmp_path, name):
    arc = _tar(tmp_path / "a.tar", {name: b"x"}, mode="w")
    with pytest.raises(UnsafeArchive, match="evil"):
        extract_archive(arc, tmp_path / "out", max_bytes=1000)
    assert not (tmp_path / "evil.json").exists() and not list((tmp_path / "out").iterdir())


def test_zip_traversal_refused(tmp_path):
    arc = tmp_path / "a.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("../../evil.json", "{}")
    with pytest.raises(UnsafeArchive, match="traversal"):
        extract_archive(arc, tmp_path / "out", max_bytes=1000)


def test_symlink_refused(tmp_path):
    arc = _tar(tmp_path / "a.tar", {}, mode="w", links=[("adapter_config.json", "/etc/passwd")])
    with pytest.raises(UnsafeArchive, match="link"):
        extract_archive(arc, tmp_path / "out", max_bytes=1000)


def test_bomb_stops_at_cap(tmp_path):
    arc = _tar(tmp_path / "a.tar.gz", {"big.bin": b"\0" * 100_000})
    with pytest.raises(AdapterTooLarge):
        extract_archive(arc, tmp_path / "out", max_bytes=10_000)


def test_corrupt_archive(tmp_path):
    arc = _tar(tmp_path / "a.tar.gz", {"f": b"x" * 50_000})
    arc.write_bytes(arc.read_bytes()[:100])
    with pytest.raises(AdapterInvalid):
        extract_archive(arc, tmp_path / "out", max_bytes=1_000_000)
