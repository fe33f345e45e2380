"""An in-memory LRU of image embeddings, bounded by bytes, with single flight."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")

#: Default byte budget (``SAM_MEMORY_CACHE_MB`` overrides it): about a hundred
#: ViT-B embeddings (4 MiB each in float32).
DEFAULT_BUDGET_BYTES = 512 * 1024 * 1024


class LRUCache(Generic[V]):
    """A thread-safe least-recently-used map bounded by the total size of its values.

    ``get_or_compute`` runs the computation once per key even when several
    threads ask for the same missing key at once: the others wait for it
    (single flight). Different keys never wait for each other.

    Args:
        budget_bytes: the most bytes kept; the least recently used entries go first.
            An entry larger than the budget is returned but not kept.
        sizeof: the size of a value in bytes.

    Example:
        >>> cache = LRUCache(budget_bytes=100, sizeof=len)
        >>> cache.get_or_compute("a", lambda: b"x" * 60)[:3]
        b'xxx'
        >>> "a" in cache
        True
    """

    def __init__(self, budget_bytes: int, sizeof: Callable[[V], int]):
        self.budget_bytes = budget_bytes
        self._sizeof = sizeof
        # key -> (value, size, when a caller last used it: 0.0 for a spare nobody has asked for)
        self._entries: OrderedDict[Hashable, tuple[V, int, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def get(self, key: Hashable) -> V | None:
        """The value for ``key`` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries[key] = (entry[0], entry[1], time.monotonic())
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value``, evicting least recently used entries to stay in budget."""
        size = self._sizeof(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.budget_bytes:
                return
            self._entries[key] = (value, size, time.monotonic())
            self._bytes += size
            while self._bytes > self.budget_bytes:
                _, (_, evicted, _) = self._entries.popitem(last=False)
                self._bytes -= evicted

    def put_spare(self, key: Hashable, value: V, protect_seconds: float) -> bool:
        """Keep a value nobody has asked for yet (a look-ahead), if it costs no recently used entry.

        It goes in at the least recently used end, so that the next
        :meth:`put` evicts it before anything a caller used, and only if the
        room it needs comes from entries unused for ``protect_seconds``.
        Returns whether it was kept; a :meth:`get` makes it an ordinary entry.
        """
        size = self._sizeof(value)
        with self._lock:
            if key in self._entries:
                return True
            if size > self.budget_bytes:
                return False
            recent = time.monotonic() - protect_seconds
            needed, evict = self._bytes + size - self.budget_bytes, []
            for old_key, (_, old_size, used) in self._entries.items():
                if needed <= 0:
                    break
                if used > recent:
                    return False
                evict.append(old_key)
                needed -= old_size
            for old_key in evict:
                self._bytes -= self._entries.pop(old_key)[1]
            self._entries[key] = (value, size, 0.0)
            self._entries.move_to_end(key, last=False)
            self._bytes += size
            return True

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The cached value, or ``compute()`` stored under ``key`` (once per key)."""
        value = self.get(key)
        if value is not None:
            self.hits += 1
            return value
        with self._lock:
            flight = self._inflight.setdefault(key, threading.Lock())
        with flight:
            value = self.get(key)  # computed by the thread we waited for
            if value is not None:
                self.hits += 1
                return value
            self.misses += 1
            try:
                value = compute()
                self.put(key, value)
            finally:
                with self._lock:
                    self._inflight.pop(key, None)
            return value

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
