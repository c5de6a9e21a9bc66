"""Reclaiming blobs safely: claims that guard a registration's blobs while it runs, delete marks,
and a background collector.

Blobs are content-addressed and shared: two names (or versions) with a file in common point to
one blob, and a registration that finds its blob already stored only checks that it is there. So a
blob may be deleted only when no live manifest lists it and no registration is between storing (or
finding) it and publishing its manifest. Redis holds the coordination, with ``P`` the namespace:

    P:blob:<sha>:claims    hash    registration token -> Redis time of its claim; the key expires
                                   after claim_ttl_s, so a crashed registration's claim goes away
    P:blob:<sha>:deleting  string  set while one deleter removes the blob; expires after
                                   delete_ttl_s, so a crashed deleter cannot block the blob forever

Protocol. A registration claims its blobs before it stores them, claims them again (and
re-verifies them) just before it publishes, and releases the claims after publishing; a claim
waits while the blob is marked as deleting. A deleter lists the live manifests, marks each
unreferenced blob as deleting (atomically with the check that no claim exists), lists the live
manifests again, and deletes only the marked blobs that are still unreferenced. A manifest
published after the second listing was claimed before the mark (so the mark was refused) or
after it (so its registration waits for the delete to finish and stores the blob again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from .errors import StorageUnavailable
from .redis_conn import redis_errors

log = logging.getLogger(__name__)

_CLAIM = """
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i + 1]) == 1 then return ARGV[2 + (i + 1) / 2] end
end
local now = redis.call('TIME')[1]
for i = 1, #KEYS, 2 do
  redis.call('HSET', KEYS[i], ARGV[1], now)
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
return false
"""

_MARK = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
return 0
"""

_UNMARK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


class BlobClaims:
    """The Redis side of the protocol in the module docstring."""

    def __init__(self, client: redis.Redis, *, namespace: str = "molora", claim_ttl_s: int = 3600,
                 delete_ttl_s: int = 300, wait_s: float = 30.0):
        self.client = client
        self.ns = namespace
        self.claim_ttl_s = claim_ttl_s
        self.delete_ttl_s = delete_ttl_s
        self.wait_s = wait_s
        self._claim = client.register_script(_CLAIM)
        self._mark = client.register_script(_MARK)
        self._unmark = client.register_script(_UNMARK)

    def _claims_key(self, sha256: str) -> str:
        return f"{self.ns}:blob:{sha256}:claims"

    def _deleting_key(self, sha256: str) -> str:
        return f"{self.ns}:blob:{sha256}:deleting"

    def claim(self, shas: list[str], token: str) -> None:
        """Claim ``shas`` for registration ``token``; waits (up to wait_s) while one is being deleted."""
        keys = [k for sha in shas for k in (self._claims_key(sha), self._deleting_key(sha))]
        args = [token, self.claim_ttl_s, *shas]
        deadline = time.monotonic() + self.wait_s
        while True:
            with redis_errors("claiming blobs"):
                busy = self._claim(keys=keys, args=args)
            if not busy:
                return
            if time.monotonic() > deadline:
                raise StorageUnavailable(f"blob {busy} has been being deleted for over {self.wait_s} s; retry later")
            time.sleep(0.05)

    def release(self, shas: list[str], token: str) -> None:
        with redis_errors("releasing blob claims"):
            pipe = self.client.pipeline(transaction=False)
            for sha in shas:
                pipe.hdel(self._claims_key(sha), token)
            pipe.execute()

    def mark_deleting(self, sha256: str, token: str) -> bool:
        """Mark ``sha256`` as being deleted by ``token``; False when it is claimed or already marked."""
        with redis_errors(f"marking blob {sha256} for deletion"):
            keys = [self._claims_key(sha256), self._deleting_key(sha256)]
            return bool(self._mark(keys=keys, args=[token, self.delete_ttl_s]))

    def unmark(self, sha256: str, token: str) -> None:
        with redis_errors(f"unmarking blob {sha256}"):
            self._unmark(keys=[self._deleting_key(sha256)], args=[token])


class BlobCollector:
    """Runs ``collect`` in a daemon thread when asked (``request``), and again while it reports
    unreferenced blobs that it had to keep for now (too young, or claimed), so the blobs of deleted
    artifacts go away without anyone calling it and without blocking the caller.

    ``collect()`` returns the seconds after which a kept blob may be collectable, or None when it
    kept none."""

    def __init__(self, collect: Callable[[], float | None], *, min_wait_s: float = 30.0):
        self._collect = collect
        self.min_wait_s = min_wait_s
        self._lock = threading.Lock()
        self._pending = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def request(self) -> None:
        """Ask for a collection soon; returns at once."""
        with self._lock:
            self._pending = True
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="molora-blob-gc", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pending or self._stop.is_set():
                    self._thread = None
                    return
                self._pending = False
            try:
                again = self._collect()
            except Exception:  # noqa: BLE001 - a background job: log, retry later, never die silently
                log.exception("blob garbage collection failed; retrying")
                again = self.min_wait_s
            if again is not None:
                with self._lock:
                    self._pending = True
                if self._stop.wait(max(again, self.min_wait_s)):
                    with self._lock:
                        self._thread = None
                    return

    def stop(self) -> None:
        self._stop.set()
