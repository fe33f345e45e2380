"""An embedding store in Redis, for several backend hosts behind one load balancer.

Same keys and the same ``.npz`` entries as :class:`~sam_backend.embeddings.store.DiskStore`;
Redis itself bounds the size: give the server a ``maxmemory`` and
``maxmemory-policy allkeys-lru``. Selected by ``SAM_CACHE_URL=redis://host:6379/0``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from urllib.parse import urlsplit, urlunsplit

from sam_backend.errors import StoreError
from sam_backend.embeddings.store import (
    FORMAT_VERSION,
    LOCK_TIMEOUT_SECONDS,
    CorruptEntryError,
    StoredEmbedding,
    StoreStats,
    decode_entry,
    encode_entry,
)

logger = logging.getLogger(__name__)

#: Seconds to wait for Redis per command; an unreachable Redis costs a click this much once, then an encode.
SOCKET_TIMEOUT = 5.0
#: After a failure, Redis is left alone this long (lookups are misses, writes
#: are skipped): a Redis that hangs must cost one timeout, not one per command
#: of every click. Then the next command tries it again.
RETRY_SECONDS = 30.0


def _redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class RedisStore:
    """Embeddings in Redis, shared by every worker of every host that points at it.

    - ``SET`` is atomic, so readers never see a partial entry; an entry that
      cannot be decoded is deleted and recomputed.
    - :meth:`lock` is a Redis lock (``SET NX`` with an expiry, released only by
      its owner), so hosts asked for the same new image encode it once; the
      expiry frees it if its holder dies.
    - Redis failures are logged (once a minute) and count as misses: the
      backend encodes, it never fails a click because of the store. After a
      failure Redis is not asked for ``RETRY_SECONDS``, so a hung Redis costs
      one ``SOCKET_TIMEOUT``, not one per command.

    Args:
        client: a ``redis.Redis``.
        location: how logs name it (the URL without its password).

    Example:
        >>> store = RedisStore.from_url("redis://cache.internal:6379/0")  # doctest: +SKIP
        >>> store.stats().entries  # doctest: +SKIP
        1520
    """

    #: The tier name in metrics and logs.
    tier = "redis"

    def __init__(self, client, location: str):
        self.client = client
        self.location = location
        self.prefix = f"sam:v{FORMAT_VERSION}:"
        self._last_warning = 0.0
        self._retry_at = 0.0  # monotonic time before which Redis is not asked (after a failure)

    @classmethod
    def from_url(cls, url: str) -> "RedisStore":
        """Connect to ``url`` (``redis://``, ``rediss://``, ``unix://``) and check that it answers.

        Raises:
            StoreError: the ``redis`` package is missing, the URL is malformed, or Redis does not answer.
        """
        try:
            import redis
        except ImportError:
            raise StoreError("SAM_CACHE_URL needs the redis package: pip install 'sam-backend[redis]'") from None
        location = _redacted(url)
        try:
            client = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT)
            client.ping()
        except ValueError as exc:
            raise StoreError(f"SAM_CACHE_URL is not a Redis URL ({exc}); use redis://host:6379/0") from None
        except redis.RedisError as exc:
            raise StoreError(f"Cannot reach Redis at {location} ({exc})") from None
        return cls(client, location)

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _failed(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        self._retry_at = now + RETRY_SECONDS
        if now - self._last_warning > 60:
            self._last_warning = now
            logger.warning("Redis at %s failed to %s (%s); encoding instead, and trying Redis again in %.0fs.",
                           self.location, what, exc, RETRY_SECONDS)

    def _resting(self) -> bool:
        """Whether Redis failed recently, so that commands are skipped for now."""
        return time.monotonic() < self._retry_at

    def get(self, key: str) -> StoredEmbedding | None:
        import redis

        if self._resting():
            return None
        try:
            data = self.client.get(self._key(key))
        except redis.RedisError as exc:
            self._failed("read", exc)
            return None
        if data is None:
            return None
        try:
            return decode_entry(data)
        except CorruptEntryError as exc:
            logger.warning("Dropping the stored embedding %s from %s: %s; it will be computed again.", key, self.location, exc)
            self.discard(key)
            return None

    def put(self, key: str, entry: StoredEmbedding) -> bool:
        return self._write(key, encode_entry(entry))

    def _write(self, key: str, data: bytes) -> bool:
        import redis

        if self._resting():
            return False
        try:
            self.client.set(self._key(key), data)
            return True
        except redis.RedisError as exc:
            self._failed("write", exc)
            return False

    def put_spare(self, key: str, entry: StoredEmbedding, protect_seconds: float) -> bool:
        """:meth:`put` an entry nobody has used yet (a look-ahead) only where Redis evicts nothing for it.

        Redis's own LRU cannot tell a look-ahead from a click's entry, so the
        entry is written only while ``used_memory`` plus its size stays under
        ``maxmemory`` (always, without a ``maxmemory``).
        """
        import redis

        if self._resting():
            return False
        data = encode_entry(entry)
        try:
            memory = self.client.info("memory")
        except redis.RedisError as exc:
            self._failed("read memory info", exc)
            return False
        limit = int(memory.get("maxmemory") or 0)
        if limit and int(memory.get("used_memory") or 0) + len(data) > limit:
            return False
        return self._write(key, data)

    def discard(self, key: str) -> None:
        import redis

        if self._resting():
            return
        try:
            self.client.delete(self._key(key))
        except redis.RedisError as exc:
            self._failed("delete", exc)

    def touch(self, key: str) -> None:
        import redis

        if self._resting():
            return
        try:
            self.client.touch(self._key(key))  # resets the idle time that allkeys-lru evicts by
        except redis.RedisError as exc:
            self._failed("touch", exc)

    @contextlib.contextmanager
    def lock(self, key: str, timeout: float = LOCK_TIMEOUT_SECONDS):
        import redis
        from redis.exceptions import LockError

        lock = self.client.lock(self.prefix + "lock:" + key, timeout=timeout, sleep=0.05,
                                blocking_timeout=timeout, thread_local=False)
        acquired = False  # while Redis rests, encoding goes on without its lock
        if not self._resting():
            try:
                acquired = lock.acquire()
            except redis.RedisError as exc:
                self._failed("lock", exc)
            else:
                if not acquired and timeout > 0:  # a caller that asked not to wait knows
                    logger.warning("Waited %.0fs for another worker to encode %s; encoding it here.", timeout, key)
        try:
            yield acquired
        finally:
            if acquired:
                # Expired meanwhile (an encode longer than the timeout): someone else may hold it now.
                with contextlib.suppress(LockError, redis.RedisError):
                    lock.release()

    def _entry_keys(self):
        lock_prefix = self.prefix + "lock:"
        for raw in self.client.scan_iter(match=self.prefix + "*", count=1000):
            name = raw.decode() if isinstance(raw, bytes) else raw
            if not name.startswith(lock_prefix):
                yield name

    def stats(self) -> StoreStats:
        import redis

        stats = StoreStats(location=self.location, budget_bytes=None)
        try:
            names = list(self._entry_keys())
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.strlen(name)
            for name, size in zip(names, pipe.execute()):
                preset = name[len(self.prefix):].split("/")[0]
                stats.entries += 1
                stats.bytes += int(size or 0)
                counts = stats.presets.setdefault(preset, [0, 0])
                counts[0] += 1
                counts[1] += int(size or 0)
            info = self.client.info("memory")
            if info.get("maxmemory"):
                stats.budget_bytes = int(info["maxmemory"])
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {self.location} failed to list the store ({exc})") from None
        return stats

    def clear(self) -> int:
        import redis

        try:
            names = list(self._entry_keys())
            for start in range(0, len(names), 500):
                self.client.unlink(*names[start:start + 500])
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {self.location} failed to clear the store ({exc})") from None
        return len(names)
