"""How one kind of artifact (adapters or routers) is kept in Redis.

Keys, with ``P`` the namespace (default ``molora``), ``K`` the kind and ``N`` the name:

    P:K:N:seq       int     last version handed out; never reused, so versions are monotonic
    P:K:N:versions  hash    version -> manifest JSON (without the version field) of live versions
    P:K:N:bysha     hash    content sha256 -> version, for idempotent re-registration
    P:K:N:latest    int     highest live version
    P:K:N:tomb      hash    version -> manifest JSON of deleted versions (tombstones)
    P:K:index       zset    names with at least one live version (score 0, ordered by name)
    P:events        stream  every registry event; P:events is also the pub/sub channel

Publishing and deleting are Lua scripts: each runs as one transaction that also appends the
event to the stream and publishes it, so a manifest and its event appear together or not at all.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import redis

from .manifest import MANIFEST_TYPES, ArtifactManifest
from .redis_conn import redis_errors

log = logging.getLogger(__name__)

_REGISTER = """
local v = redis.call('HGET', KEYS[3], ARGV[1])
if v and redis.call('HEXISTS', KEYS[2], v) == 1 then
  return {0, tonumber(v)}
end
v = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], v, ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], v)
redis.call('SET', KEYS[4], v)
redis.call('ZADD', KEYS[5], 0, ARGV[3])
local etype = ARGV[4] .. '.registered'
local id = redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[7], '*',
  'type', etype, 'kind', ARGV[4], 'name', ARGV[3], 'version', v, 'sha256', ARGV[1], 'ts', ARGV[6])
redis.call('PUBLISH', ARGV[5], cjson.encode({id=id, type=etype, kind=ARGV[4], name=ARGV[3],
  version=v, sha256=ARGV[1], ts=ARGV[6]}))
return {1, v}
"""

_GET = """
local v = ARGV[1]
if v == '' then
  v = redis.call('GET', KEYS[2])
  if not v then
    if redis.call('EXISTS', KEYS[3]) == 1 then return {'0', false, 'deleted'} end
    return {}
  end
end
local body = redis.call('HGET', KEYS[1], v)
if body then return {v, body} end
if redis.call('HEXISTS', KEYS[3], v) == 1 then return {v, false, 'deleted'} end
return {}
"""

_DELETE = """
local targets
if ARGV[4] == '' then
  targets = redis.call('HKEYS', KEYS[1])
elseif redis.call('HEXISTS', KEYS[1], ARGV[4]) == 1 then
  targets = {ARGV[4]}
else
  targets = {}
end
if #targets == 0 then return {} end
local gone = {}
for _, v in ipairs(targets) do
  redis.call('HSET', KEYS[5], v, redis.call('HGET', KEYS[1], v))
  redis.call('HDEL', KEYS[1], v)
  gone[v] = true
end
local map = redis.call('HGETALL', KEYS[2])
for i = 1, #map, 2 do
  if gone[map[i + 1]] then redis.call('HDEL', KEYS[2], map[i]) end
end
local left = redis.call('HKEYS', KEYS[1])
if #left == 0 then
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[1])
else
  local top = 0
  for _, v in ipairs(left) do if tonumber(v) > top then top = tonumber(v) end end
  redis.call('SET', KEYS[3], top)
end
local etype = ARGV[2] .. '.deleted'
for _, v in ipairs(targets) do
  local id = redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[6], '*',
    'type', etype, 'kind', ARGV[2], 'name', ARGV[1], 'version', v, 'sha256', '', 'ts', ARGV[5])
  redis.call('PUBLISH', ARGV[3], cjson.encode({id=id, type=etype, kind=ARGV[2], name=ARGV[1],
    version=tonumber(v), sha256='', ts=ARGV[5]}))
end
return targets
"""


@dataclass(frozen=True)
class Lookup:
    """Result of a get: the manifest, or why there is none."""

    manifest: ArtifactManifest | None
    deleted: bool = False


class ArtifactTable:
    """Redis operations for one artifact kind ('adapter' or 'router')."""

    def __init__(self, client: redis.Redis, kind: str, *, namespace: str = "molora", stream_maxlen: int = 100_000):
        self.client = client
        self.kind = kind
        self.ns = namespace
        self.model = MANIFEST_TYPES[kind]
        self.stream_key = f"{namespace}:events"
        self.stream_maxlen = stream_maxlen
        self._register = client.register_script(_REGISTER)
        self._get = client.register_script(_GET)
        self._delete = client.register_script(_DELETE)

    def _k(self, name: str, part: str) -> str:
        return f"{self.ns}:{self.kind}:{name}:{part}"

    @property
    def index_key(self) -> str:
        return f"{self.ns}:{self.kind}:index"

    def _decode(self, version: int | str, body: str) -> ArtifactManifest:
        data = json.loads(body)
        data["version"] = int(version)
        return self.model.model_validate(data)

    def publish(self, manifest: ArtifactManifest, ts: float) -> tuple[ArtifactManifest, bool]:
        """Publish ``manifest`` as the next version of its name, or return the live version that
        already has the same content. Returns (manifest with version, created)."""
        body = manifest.model_dump_json(exclude={"version"})
        keys = [self._k(manifest.name, p) for p in ("seq", "versions", "bysha", "latest")]
        keys += [self.index_key, self.stream_key]
        args = [manifest.sha256, body, manifest.name, self.kind, self.stream_key, repr(ts), self.stream_maxlen]
        with redis_errors(f"publishing {self.kind} {manifest.name!r}"):
            created, version = self._register(keys=keys, args=args)
        if created:
            return manifest.model_copy(update={"version": int(version)}), True
        return self.get(manifest.name, int(version)).manifest, False

    def get(self, name: str, version: int | None = None) -> Lookup:
        keys = [self._k(name, "versions"), self._k(name, "latest"), self._k(name, "tomb")]
        with redis_errors(f"reading {self.kind} {name!r}"):
            out = self._get(keys=keys, args=["" if version is None else str(version)])
        if not out:
            return Lookup(None)
        if len(out) == 3 or out[1] is None:
            return Lookup(None, deleted=True)
        return Lookup(self._decode(out[0], out[1]))

    def versions(self, name: str) -> list[ArtifactManifest]:
        with redis_errors(f"listing versions of {self.kind} {name!r}"):
            raw = self.client.hgetall(self._k(name, "versions"))
        return [self._decode(v, b) for v, b in sorted(raw.items(), key=lambda kv: int(kv[0]))]

    def names(self, after: str | None, count: int, prefix: str = "") -> list[str]:
        """Live names in order, strictly after ``after``, starting with ``prefix``."""
        lo = f"({after}" if after is not None and after >= prefix else (f"[{prefix}" if prefix else "-")
        hi = f"[{prefix}\xff" if prefix else "+"
        with redis_errors(f"listing {self.kind}s"):
            return self.client.zrangebylex(self.index_key, lo, hi, start=0, num=count)

    def latest_many(self, names: list[str]) -> list[ArtifactManifest]:
        """Latest manifests of ``names`` (names deleted meanwhile are skipped)."""
        if not names:
            return []
        with redis_errors(f"reading {self.kind}s"):
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                self._get(keys=[self._k(name, "versions"), self._k(name, "latest"), self._k(name, "tomb")],
                          args=[""], client=pipe)
            results = pipe.execute()
        out = []
        for name, r in zip(names, results):
            if r and len(r) == 2 and r[1]:
                try:
                    out.append(self._decode(r[0], r[1]))
                except ValueError:  # (pydantic's ValidationError and JSONDecodeError are ValueErrors)
                    # One unreadable record (written by an older release, or by hand) must not take
                    # every listing down with it (reading it by name is still an error).
                    log.exception("skipping %s %r version %s in a listing: its manifest does not decode",
                                  self.kind, name, r[0])
        return out

    def delete(self, name: str, version: int | None, ts: float) -> list[int]:
        """Tombstone one version (or all of them); returns the versions deleted."""
        keys = [self._k(name, p) for p in ("versions", "bysha", "latest")]
        keys += [self.index_key, self._k(name, "tomb"), self.stream_key]
        args = [name, self.kind, self.stream_key, "" if version is None else str(version), repr(ts), self.stream_maxlen]
        with redis_errors(f"deleting {self.kind} {name!r}"):
            gone = self._delete(keys=keys, args=args)
        return sorted(int(v) for v in gone)

    def all_live(self) -> list[ArtifactManifest]:
        """Every live version of every name (for garbage collection)."""
        out: list[ArtifactManifest] = []
        after = None
        while names := self.names(after, 500):
            for name in names:
                out += self.versions(name)
            after = names[-1]
        return out
