"""The registry: register, get, list, delete and cold-load adapters and routers.

Registration is validate -> upload -> verify -> publish: the manifest is written to Redis (in one
Lua transaction with its event) only after every blob is stored and verified, so any failure
before that leaves nothing registered (uploaded blobs without a manifest are unreferenced and
``collect_garbage`` removes them). Registering the same content under the same name again
returns the existing version.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import redis

from .artifact_table import ArtifactTable
from .base_model import BaseModelSignature
from .blob_cache import BlobCache
from .errors import AdapterInvalid, AdapterNotFound, AdapterTooLarge, NotFound, RouterInvalid, RouterNotFound
from .events import EventLog
from .manifest import AdapterManifest, ArtifactManifest, FileEntry, RouterManifest, check_name, content_id
from .peft_validate import ADAPTER_FILES, refuse_pickles, validate_adapter
from .redis_conn import redis_errors
from .replicas import ReplicaDirectory
from .router_validate import ROUTER_CONFIG, ROUTER_WEIGHTS, validate_router
from .storage_base import ObjectStorage, ProgressFn, hash_file

_TAG_RE = re.compile(r"^[A-Za-z0-9._:/=-]{1,64}$")
ROUTER_KINDS = ("gate", "task")


@dataclass(frozen=True)
class StoreLimits:
    max_adapter_bytes: int = 512 << 20  # total bytes of an artifact's files
    max_rank: int = 64                  # the hot-set's R


@dataclass(frozen=True)
class RegisterResult:
    manifest: ArtifactManifest
    created: bool  # False: the same content was already registered under this name


@dataclass(frozen=True)
class LoadedArtifact:
    manifest: ArtifactManifest
    path: Path  # local directory holding the artifact's files, verified


@dataclass(frozen=True)
class Page:
    items: list[ArtifactManifest]
    next_cursor: str | None  # pass back as ``cursor`` for the next page; None at the end


def check_tags(tags: Iterable[str]) -> list[str]:
    tags = list(tags)
    bad = [t for t in tags if not isinstance(t, str) or not _TAG_RE.match(t)]
    if bad or len(tags) > 64:
        raise AdapterInvalid(f"tags {bad or tags!r} are invalid, expected at most 64 of {_TAG_RE.pattern}", param="tags")
    return sorted(set(tags))


def _check_description(description: str) -> None:
    if not isinstance(description, str) or len(description) > 4096:
        raise AdapterInvalid(f"description of {len(str(description))} characters, expected at most 4096", param="description")


class Registry:
    def __init__(
        self, client: redis.Redis, storage: ObjectStorage, cache: BlobCache, base_model: BaseModelSignature,
        *, limits: StoreLimits = StoreLimits(), staging_dir: str | Path, namespace: str = "molora",
        replica_ttl_s: float = 15.0,
    ):
        self.client = client
        self.storage = storage
        self.cache = cache
        self.base_model = base_model
        self.limits = limits
        self.staging_dir = Path(staging_dir)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.adapters = ArtifactTable(client, "adapter", namespace=namespace)
        self.routers = ArtifactTable(client, "router", namespace=namespace)
        self.events = EventLog(client, namespace=namespace)
        self.replicas = ReplicaDirectory(client, self.events, namespace=namespace, ttl_s=replica_ttl_s)

    # ---- registration -------------------------------------------------------------------

    def staging(self) -> Path:
        """A fresh private directory for an upload; the caller removes it (see ``discard``)."""
        path = self.staging_dir / uuid.uuid4().hex
        path.mkdir()
        return path

    @staticmethod
    def discard(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def _check_size(self, total: int) -> None:
        if total > self.limits.max_adapter_bytes:
            raise AdapterTooLarge(f"artifact is {total} bytes, over the cap of {self.limits.max_adapter_bytes} bytes")

    def _store_files(self, files: dict[str, Path], progress: ProgressFn | None) -> list[FileEntry]:
        entries = []
        for name, path in sorted(files.items()):
            sha, size = hash_file(path)
            entries.append(FileEntry(path=name, sha256=sha, size=size))
        self._check_size(sum(e.size for e in entries))
        total, base = sum(e.size for e in entries), 0
        for e in entries:
            step = None if progress is None else (lambda d, _t, b=base: progress(b + d, total))
            self.storage.put_blob(files[e.path], e.sha256, e.size, progress=step)
            self.storage.verify_blob(e.sha256, e.size)
            base += e.size
        return entries

    def register_adapter(
        self, directory: str | Path, name: str, *, description: str = "", tags: Iterable[str] = (),
        progress: ProgressFn | None = None,
    ) -> RegisterResult:
        """Register the PEFT adapter in local ``directory`` as the next version of ``name``."""
        check_name(name)
        tags = check_tags(tags)
        _check_description(description)
        directory = Path(directory)
        self._check_size(sum(p.stat().st_size for p in directory.iterdir() if p.is_file()))
        info = validate_adapter(directory, self.base_model, max_rank=self.limits.max_rank)
        files = self._store_files({f: directory / f for f in ADAPTER_FILES}, progress)
        manifest = AdapterManifest(
            name=name, sha256=content_id(files), size=sum(f.size for f in files), files=files,
            description=description, tags=tags, created_at=time.time(),
            rank=info.rank, alpha=info.alpha, use_rslora=info.use_rslora, rank_pattern=info.rank_pattern,
            alpha_pattern=info.alpha_pattern, target_modules=info.target_modules, layers=info.layers,
            dtype=info.dtype, base_model=self.base_model, base_model_name_or_path=info.base_model_name_or_path,
        )
        published, created = self.adapters.publish(manifest, manifest.created_at)
        return RegisterResult(published, created)

    def _fetch_uri(self, uri: str, wanted: tuple[str, ...], required: tuple[str, ...]) -> Path:
        listing = self.storage.list_uri(uri)
        refuse_pickles(sorted(listing))
        missing = [f for f in required if f not in listing]
        if missing:
            raise AdapterInvalid(f"{uri} is missing {missing}; found {sorted(listing)}", param="uri")
        self._check_size(sum(listing[f] for f in wanted if f in listing))
        staging = self.staging()
        try:
            for f in wanted:
                if f in listing:
                    self.storage.fetch_uri(uri, f, staging / f)
        except BaseException:
            self.discard(staging)
            raise
        return staging

    def register_adapter_from_uri(self, uri: str, name: str, **kwargs) -> RegisterResult:
        """Register an adapter directory that already lies in the configured storage."""
        check_name(name)
        staging = self._fetch_uri(uri, ADAPTER_FILES, ADAPTER_FILES)
        try:
            return self.register_adapter(staging, name, **kwargs)
        finally:
            self.discard(staging)

    def register_router(
        self, directory: str | Path, name: str, *, kind: str, adapters: list[str], description: str = "",
        tags: Iterable[str] = (), progress: ProgressFn | None = None,
    ) -> RegisterResult:
        """Register a router; ``adapters`` (ordered) must all be registered adapters."""
        check_name(name, "router")
        tags = check_tags(tags)
        _check_description(description)
        if kind not in ROUTER_KINDS:
            raise RouterInvalid(f"router kind {kind!r} is not known, expected one of {list(ROUTER_KINDS)}", param="kind")
        if not adapters:
            raise AdapterInvalid("a router needs at least one adapter", param="adapters")
        for a in adapters:
            check_name(a)
        if len(set(adapters)) != len(adapters):
            raise AdapterInvalid(f"router adapters {adapters} repeat a name, expected distinct names", param="adapters")
        for a in adapters:
            self.get_adapter(a)
        files = self._store_files(validate_router(Path(directory)), progress)
        manifest = RouterManifest(
            name=name, sha256=content_id(files, extra=f"{kind}:{','.join(adapters)}"),
            weights_sha256=next(f.sha256 for f in files if f.path == ROUTER_WEIGHTS),
            size=sum(f.size for f in files), files=files, description=description, tags=tags,
            created_at=time.time(), kind=kind, adapters=list(adapters), base_model_id=self.base_model.id,
        )
        published, created = self.routers.publish(manifest, manifest.created_at)
        return RegisterResult(published, created)

    def register_router_from_uri(self, uri: str, name: str, **kwargs) -> RegisterResult:
        check_name(name, "router")
        staging = self._fetch_uri(uri, (ROUTER_WEIGHTS, ROUTER_CONFIG), (ROUTER_WEIGHTS,))
        try:
            return self.register_router(staging, name, **kwargs)
        finally:
            self.discard(staging)

    # ---- reads ---------------------------------------------------------------------------

    def _get(self, table: ArtifactTable, error: type[NotFound], name: str, version: int | None):
        check_name(name, table.kind)
        found = table.get(name, version)
        if found.manifest is None:
            which = f"{name!r}" if version is None else f"{name!r} version {version}"
            why = "was deleted" if found.deleted else "is not registered"
            raise error(f"{table.kind} {which} {why}", param="name")
        return found.manifest

    def get_adapter(self, name: str, version: int | None = None) -> AdapterManifest:
        """The latest (or the pinned) live version of adapter ``name``; AdapterNotFound otherwise."""
        return self._get(self.adapters, AdapterNotFound, name, version)

    def get_router(self, name: str, version: int | None = None) -> RouterManifest:
        return self._get(self.routers, RouterNotFound, name, version)

    def _list(self, table: ArtifactTable, limit: int, cursor: str | None, tag: str | None, prefix: str) -> Page:
        if not 1 <= limit <= 1000:
            raise AdapterInvalid(f"limit={limit}, expected 1..1000", param="limit")
        items: list[ArtifactManifest] = []
        after = cursor
        while len(items) < limit:
            names = table.names(after, limit - len(items) if tag is None else max(limit, 100), prefix)
            if not names:
                return Page(items, None)
            for m in table.latest_many(names):
                if tag is None or tag in m.tags:
                    items.append(m)
                    after = m.name
                    if len(items) == limit:
                        break
            else:
                after = names[-1]
        return Page(items, after)

    def list_adapters(self, limit: int = 100, cursor: str | None = None, tag: str | None = None, prefix: str = "") -> Page:
        """Latest version of each adapter, by name; ``tag`` and name ``prefix`` filter."""
        return self._list(self.adapters, limit, cursor, tag, prefix)

    def list_routers(self, limit: int = 100, cursor: str | None = None, tag: str | None = None, prefix: str = "") -> Page:
        return self._list(self.routers, limit, cursor, tag, prefix)

    def adapter_versions(self, name: str) -> list[AdapterManifest]:
        versions = self.adapters.versions(check_name(name))
        if not versions:
            raise AdapterNotFound(f"adapter {name!r} is not registered", param="name")
        return versions

    # ---- deletion ------------------------------------------------------------------------

    def _delete(self, table: ArtifactTable, error: type[NotFound], name: str, version: int | None) -> list[int]:
        check_name(name, table.kind)
        gone = table.delete(name, version, time.time())
        if not gone:
            which = f"{name!r}" if version is None else f"{name!r} version {version}"
            raise error(f"{table.kind} {which} is not registered", param="name")
        return gone

    def delete_adapter(self, name: str, version: int | None = None) -> list[int]:
        """Tombstone one version or all versions; emits adapter.deleted per version."""
        return self._delete(self.adapters, AdapterNotFound, name, version)

    def delete_router(self, name: str, version: int | None = None) -> list[int]:
        return self._delete(self.routers, RouterNotFound, name, version)

    def collect_garbage(self, grace_s: float = 3600.0) -> list[str]:
        """Delete blobs no live manifest references and older than ``grace_s`` (so blobs of a
        registration in flight survive). Returns the removed sha256s."""
        live = {f.sha256 for t in (self.adapters, self.routers) for m in t.all_live() for f in m.files}
        cutoff = time.time() - grace_s
        removed = []
        for blob in list(self.storage.list_blobs()):
            if blob.sha256 not in live and blob.mtime <= cutoff:
                self.storage.delete_blob(blob.sha256)
                removed.append(blob.sha256)
        return removed

    # ---- cold loading --------------------------------------------------------------------

    def load(self, manifest: ArtifactManifest, progress: ProgressFn | None = None) -> LoadedArtifact:
        """Local directory with the artifact's verified files (disk cache, then storage)."""
        path = self.cache.materialize(self.storage, manifest.sha256, manifest.files, progress)
        return LoadedArtifact(manifest, path)

    def load_adapter(self, name: str, version: int | None = None, progress: ProgressFn | None = None) -> LoadedArtifact:
        return self.load(self.get_adapter(name, version), progress)

    def load_router(self, name: str, version: int | None = None, progress: ProgressFn | None = None) -> LoadedArtifact:
        return self.load(self.get_router(name, version), progress)

    def ping(self) -> None:
        """Raise RegistryUnavailable / StorageUnavailable when either is down (for health checks)."""
        with redis_errors("ping"):
            self.client.ping()
        self.storage.ping()
