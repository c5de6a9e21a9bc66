"""The registry: register, get, list, delete and cold-load adapters and routers.

Registration is validate -> build the manifest -> upload -> verify -> publish: the manifest is
written to Redis (in one Lua transaction with its event) only after every blob is stored and
verified, so any failure before that leaves nothing registered, and a failure after a blob was
stored removes the blobs that registration wrote unless a manifest references them. Registering
the same content under the same name again returns the existing version. Blobs of deleted
artifacts are reclaimed in the background after a grace period (``collect_garbage``,
``BlobCollector``; the protocol that keeps an in-flight registration's blobs safe is in blob_gc.py).
A router's publish and an adapter's delete each check the other side under one Redis lock
(``_links``), so no router is left routing to a deleted adapter.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import redis
from pydantic import ValidationError

from .artifact_table import ArtifactTable
from .base_model import BaseModelSignature
from .blob_cache import BlobCache
from .blob_gc import BlobClaims, BlobCollector
from .errors import (
    AdapterInUse, AdapterInvalid, AdapterNotFound, AdapterTooLarge, InvalidName, NotFound, RegistryUnavailable,
    RouterInvalid, RouterNotFound, StoreError,
)
from .events import EventLog
from .manifest import AdapterManifest, ArtifactManifest, FileEntry, RouterManifest, check_name, content_id
from .peft_validate import ADAPTER_FILES, refuse_pickles, validate_adapter
from .redis_conn import redis_errors
from .replicas import ReplicaDirectory
from .router_validate import ROUTER_CONFIG, ROUTER_WEIGHTS, validate_router
from .storage_base import ObjectStorage, ProgressFn, hash_file

_TAG_RE = re.compile(r"[A-Za-z0-9._:/=-]{1,64}")
ROUTER_KINDS = ("gate", "task")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreLimits:
    max_adapter_bytes: int = 512 << 20  # total bytes of an artifact's files
    max_rank: int = 64                  # the hot-set's R
    max_top_k: int = 4                  # the replicas' most adapters a token mixes (a gate's top-k)
    hot_slots: int = 8                  # a replica's hot-set: the most adapters one request can name


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
    bad = [t for t in tags if not isinstance(t, str) or not _TAG_RE.fullmatch(t)]
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
        replica_ttl_s: float = 15.0, gc_grace_s: float = 3600.0,
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
        self.claims = BlobClaims(client, namespace=namespace)
        self._links_key = f"{namespace}:lock:router-adapters"
        self.gc_grace_s = gc_grace_s  # an unreferenced blob younger than this is kept (see collect_garbage)
        self.collector = BlobCollector(self._collect_in_background)

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

    def _entries(self, files: dict[str, Path]) -> list[FileEntry]:
        entries = []
        for name, path in sorted(files.items()):
            sha, size = hash_file(path)
            entries.append(FileEntry(path=name, sha256=sha, size=size))
        self._check_size(sum(e.size for e in entries))
        return entries

    @staticmethod
    def _manifest(model: type[ArtifactManifest], **fields) -> ArtifactManifest:
        """Build a manifest; a field the checks before missed is still a 400, and it fails before
        any blob is stored."""
        try:
            return model(**fields)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise AdapterInvalid(f"{where}={str(first.get('input'))[:200]!r}: {first['msg']}", param=where) from None

    @contextlib.contextmanager
    def _links(self, what: str):
        """Held while a router's adapters are checked and it is published, and while an adapter's
        routers are checked and it is deleted: the check and the write are then one step. Expires
        by itself (a crashed holder); waits a bounded time, then RegistryUnavailable (503)."""
        lock = self.client.lock(self._links_key, timeout=30, blocking_timeout=10)
        with redis_errors(what):
            if not lock.acquire():
                raise RegistryUnavailable(f"registry busy: {what} waited 10 s for another router or adapter change")
        try:
            yield
        finally:
            with contextlib.suppress(redis.RedisError, StoreError):
                with redis_errors(what):
                    lock.release()

    def _store_and_publish(
        self, table: ArtifactTable, manifest: ArtifactManifest, files: dict[str, Path], progress: ProgressFn | None,
        before_publish=None,
    ) -> RegisterResult:
        """Upload and verify the manifest's blobs under a claim, then publish it (a router under
        ``_links``, after ``before_publish`` checks its adapters). On failure, the blobs this call
        wrote are removed unless a manifest references them."""
        token = uuid.uuid4().hex
        shas = sorted({e.sha256 for e in manifest.files})
        total, base, written = manifest.size, 0, []
        self.claims.claim(shas, token)
        try:
            for e in manifest.files:
                step = None if progress is None else (lambda d, _t, b=base: progress(b + d, total))
                if self.storage.stat_blob(e.sha256) != e.size:
                    written.append(e.sha256)
                self.storage.put_blob(files[e.path], e.sha256, e.size, progress=step)
                self.storage.verify_blob(e.sha256, e.size)
                base += e.size
            self.claims.claim(shas, token)  # waits out a delete that raced in; the blobs are checked again
            for e in manifest.files:
                if self.storage.stat_blob(e.sha256) != e.size:
                    self.storage.put_blob(files[e.path], e.sha256, e.size)
                    self.storage.verify_blob(e.sha256, e.size)
            with self._links(f"{table.kind} publish") if before_publish else contextlib.nullcontext():
                if before_publish:
                    before_publish()
                published, created = table.publish(manifest, manifest.created_at)
        except BaseException:
            self._remove_written(shas, written, token)
            raise
        try:
            self.claims.release(shas, token)
        except StoreError:
            pass  # the claims expire by themselves; the registration itself succeeded
        return RegisterResult(published, created)

    def _remove_written(self, shas: list[str], written: list[str], token: str) -> None:
        try:
            self.claims.release(shas, token)
            if written:
                self._delete_unreferenced(written)
        except Exception:  # noqa: BLE001 - the registration's own error is the one to report
            log.warning("could not remove the blobs of a failed registration; the collector will", exc_info=True)

    def register_adapter(
        self, directory: str | Path, name: str, *, description: str = "", tags: Iterable[str] = (),
        progress: ProgressFn | None = None,
    ) -> RegisterResult:
        """Register the PEFT adapter in local ``directory`` as the next version of ``name``."""
        self._check_adapter_name(name)
        tags = check_tags(tags)
        _check_description(description)
        directory = Path(directory)
        self._check_size(sum(p.stat().st_size for p in directory.iterdir() if p.is_file()))
        info = validate_adapter(directory, self.base_model, max_rank=self.limits.max_rank)
        files = {f: directory / f for f in ADAPTER_FILES}
        entries = self._entries(files)
        manifest = self._manifest(
            AdapterManifest, name=name, sha256=content_id(entries), size=sum(f.size for f in entries), files=entries,
            description=description, tags=tags, created_at=time.time(),
            rank=info.rank, alpha=info.alpha, use_rslora=info.use_rslora, rank_pattern=info.rank_pattern,
            alpha_pattern=info.alpha_pattern, target_modules=info.target_modules, layers=info.layers,
            dtype=info.dtype, base_model=self.base_model, base_model_name_or_path=info.base_model_name_or_path,
        )
        return self._store_and_publish(self.adapters, manifest, files, progress)

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

    def _check_adapter_name(self, name: str) -> None:
        """``check_name``, and not the base model's name: the API reads that `model` as the base
        model, so such an adapter would be listed but never served."""
        check_name(name)
        if name == self.base_model.name:
            raise InvalidName(f"adapter name {name!r} is the base model's name; expected another name", param="name")

    def register_adapter_from_uri(self, uri: str, name: str, **kwargs) -> RegisterResult:
        """Register an adapter directory that already lies in the configured storage."""
        self._check_adapter_name(name)
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
        if len(adapters) > self.limits.hot_slots:
            raise RouterInvalid(f"a router over {len(adapters)} adapters can never be served: a replica's hot-set "
                                f"holds hot_slots={self.limits.hot_slots} (MOLORA_HOT_SLOTS)", param="adapters")

        def live() -> None:  # before the upload, and again under the lock as the router is published
            for a in adapters:
                self.get_adapter(a)

        live()
        files = validate_router(Path(directory), kind=kind, adapters=list(adapters),
                                hidden_size=self.base_model.hidden_size, max_top_k=self.limits.max_top_k)
        entries = self._entries(files)
        manifest = self._manifest(
            RouterManifest, name=name, sha256=content_id(entries, extra=f"{kind}:{','.join(adapters)}"),
            weights_sha256=next(f.sha256 for f in entries if f.path == ROUTER_WEIGHTS),
            size=sum(f.size for f in entries), files=entries, description=description, tags=tags,
            created_at=time.time(), kind=kind, adapters=list(adapters), base_model_id=self.base_model.id,
        )
        return self._store_and_publish(self.routers, manifest, files, progress, before_publish=live)

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

    def routers_using(self, adapter: str) -> list[str]:
        """Names of the routers with a live version that routes to ``adapter``."""
        return sorted({m.name for m in self.routers.all_live() if adapter in getattr(m, "adapters", ())})

    def delete_adapter(self, name: str, version: int | None = None) -> list[int]:
        """Tombstone one version or all versions; emits adapter.deleted per version. Refused
        (AdapterInUse) when it would leave a registered router without this adapter. Blobs no
        longer referenced are reclaimed in the background."""
        check_name(name)
        with self._links("adapter delete"):
            live = [m.version for m in self.adapters.versions(name)]
            if live and (version is None or live == [version]):
                users = self.routers_using(name)
                if users:
                    raise AdapterInUse(
                        f"adapter {name!r} is used by router(s) {users}; delete or re-register those routers first "
                        f"(deleting one version while others remain is allowed)", param="name",
                    )
            gone = self._delete(self.adapters, AdapterNotFound, name, version)
        self.collector.request()
        return gone

    def delete_router(self, name: str, version: int | None = None) -> list[int]:
        gone = self._delete(self.routers, RouterNotFound, name, version)
        self.collector.request()
        return gone

    def _live_blobs(self) -> set[str]:
        return {f.sha256 for t in (self.adapters, self.routers) for m in t.all_live() for f in m.files}

    def _delete_unreferenced(self, candidates: list[str]) -> list[str]:
        """Delete those of ``candidates`` that no live manifest references and no registration
        claims (the protocol in blob_gc.py). Returns the deleted sha256s."""
        live = self._live_blobs()
        token = uuid.uuid4().hex
        marked = [sha for sha in candidates if sha not in live and self.claims.mark_deleting(sha, token)]
        removed = []
        try:
            live = self._live_blobs() if marked else live
            for sha in marked:
                if sha not in live:
                    self.storage.delete_blob(sha)
                    removed.append(sha)
        finally:
            for sha in marked:
                self.claims.unmark(sha, token)
        return removed

    def _collect(self, grace_s: float) -> tuple[list[str], float | None]:
        live = self._live_blobs()
        now = time.time()
        old, due = [], None
        for blob in list(self.storage.list_blobs()):
            if blob.sha256 in live:
                continue
            if blob.mtime <= now - grace_s:
                old.append(blob.sha256)
            else:
                wait = blob.mtime + grace_s - now
                due = wait if due is None else min(due, wait)
        removed = self._delete_unreferenced(old) if old else []
        if len(removed) < len(old):  # claimed meanwhile: a registration is using it; look again later
            due = grace_s if due is None else due
        return removed, due

    def collect_garbage(self, grace_s: float = 3600.0) -> list[str]:
        """Delete blobs no live manifest references, older than ``grace_s`` and not claimed by a
        registration in flight. Returns the removed sha256s."""
        return self._collect(grace_s)[0]

    def _collect_in_background(self) -> float | None:
        removed, due = self._collect(self.gc_grace_s)
        if removed:
            log.info("removed %d unreferenced blobs", len(removed))
        return due

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
