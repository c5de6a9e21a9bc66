"""Local disk cache for cold loads, capped in size, evicting the least recently used artifact.

An entry is one artifact directory ``<root>/<content sha256>/`` holding its files under their
names (a PEFT adapter directory the model side can load as is). Entries appear atomically (built
in a temporary directory, then renamed), and every file is verified against its sha256 when it is
fetched from storage and, by default, again on each cache hit.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from .manifest import FileEntry
from .storage_base import ObjectStorage, ProgressFn, hash_file

_MARKER = ".complete"


class BlobCache:
    def __init__(self, root: str | Path, max_bytes: int, *, verify_hits: bool = True):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.verify_hits = verify_hits
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def path_for(self, content_sha: str) -> Path:
        return self.root / content_sha

    def materialize(
        self, storage: ObjectStorage, content_sha: str, files: Sequence[FileEntry], progress: ProgressFn | None = None
    ) -> Path:
        """Return a local directory with ``files``, fetching (verified) from ``storage`` on a miss."""
        entry = self.path_for(content_sha)
        with self._lock(content_sha):
            if self._valid_hit(entry, files):
                os.utime(entry / _MARKER)
                return entry
            shutil.rmtree(entry, ignore_errors=True)
            tmp = self.root / f".tmp-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                total, base = sum(f.size for f in files), 0
                for f in files:
                    step = None if progress is None else (lambda done, _t, b=base: progress(b + done, total))
                    storage.get_blob(f.sha256, tmp / f.path, size=f.size, progress=step)
                    base += f.size
                (tmp / _MARKER).write_text(json.dumps({"size": total, "loaded_at": time.time()}))
                try:
                    os.replace(tmp, entry)
                except OSError:
                    # Another process published the same entry first; its copy is as good.
                    if not (entry / _MARKER).is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self.evict(keep=content_sha)
        return entry

    def _valid_hit(self, entry: Path, files: Sequence[FileEntry]) -> bool:
        if not (entry / _MARKER).is_file():
            return False
        for f in files:
            path = entry / f.path
            if not path.is_file() or path.stat().st_size != f.size:
                return False
            if self.verify_hits and hash_file(path)[0] != f.sha256:
                return False
        return True

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, path) of every complete entry, least recently used first."""
        out = []
        for p in self.root.iterdir():
            marker = p / _MARKER
            if p.name.startswith(".") or not marker.is_file():
                continue
            try:
                size = int(json.loads(marker.read_text())["size"])
                out.append((marker.stat().st_mtime, size, p))
            except (OSError, ValueError, KeyError):
                continue
        return sorted(out)

    def size(self) -> int:
        return sum(s for _, s, _ in self.entries())

    def evict(self, keep: str | None = None) -> list[str]:
        """Drop least recently used entries until the cache fits ``max_bytes``; return their ids."""
        entries = self.entries()
        total = sum(s for _, s, _ in entries)
        dropped = []
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if path.name == keep:
                continue
            shutil.rmtree(path, ignore_errors=True)
            total -= size
            dropped.append(path.name)
        return dropped
