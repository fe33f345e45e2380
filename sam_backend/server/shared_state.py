"""State that every worker of a host must see: what ``/setup`` said, the last click's logits.

Gunicorn runs several worker processes, and Label Studio's requests land on
any of them: a ``/setup`` answered by one worker must reach the worker that
answers the next ``/predict``, and a click that refines the previous one needs
that click's logits wherever it was computed. This module keeps such state
where the embedding store is, so that it is shared exactly as widely:

- :class:`DiskSharedState`: files under ``<store directory>/shared`` (the
  ``--cache-dir`` / ``SAM_CACHE_DIR`` of the embedding store), written to a
  temp file and renamed into place; directories ``0700`` and files ``0600``,
  as they hold Label Studio tokens.
- :class:`RedisSharedState`: keys under ``sam:shared:`` in the Redis of
  ``SAM_CACHE_URL``, with Redis' own expiry.
- :class:`MemorySharedState`: one process's memory, when neither is usable
  (a warning says so), and for tests and the commands.

A state hands out named :class:`SharedMap` s of bytes, each with an optional
time to live and a bound on its entries. Nothing is cached in a worker: every
read asks the files or Redis, so a worker always sees another's newer entry.
:class:`SharedRecords` keeps dataclasses (a project's set-up) in a map as JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import stat
import struct
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Generic, Iterable, TypeVar

from sam_backend.errors import StoreError

logger = logging.getLogger(__name__)

#: Entries a map keeps at most unless told otherwise.
DEFAULT_MAX_ENTRIES = 1024
#: Temp files older than this are left-overs of a crashed writer.
STALE_TEMP_SECONDS = 3600.0
#: The file header: a format tag and the expiry time (0: never).
_HEADER = struct.Struct("<4sd")
_MAGIC = b"SSv1"
#: Seconds between two warnings about the same failing backend.
_WARNING_INTERVAL = 60.0

R = TypeVar("R")


def _digest(key: str) -> str:
    """A fixed-length file or key name for any key string."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class SharedMap(ABC):
    """Bytes by string key, seen alike by every worker that opened the same state.

    ``ttl`` (seconds; None: forever) bounds how long an entry is returned;
    ``max_entries`` how many are kept (the oldest go first).
    """

    ttl: float | None
    max_entries: int

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The live value of ``key``, or None (missing, expired, unreadable)."""

    def get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        """``get`` for several keys, in order (one round trip where the backend allows)."""
        return [self.get(key) for key in keys]

    @abstractmethod
    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (replacing it); failures are logged, not raised."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Forget ``key`` (no error when missing)."""

    @abstractmethod
    def __len__(self) -> int:
        """Entries kept now (expired ones may count until they are pruned)."""


class SharedState(ABC):
    """Where workers keep what they must agree on; :meth:`map` opens a named :class:`SharedMap`.

    Attributes:
        kind: ``"disk"``, ``"redis"`` or ``"memory"``.
        location: where, for logs.
    """

    kind: str
    location: str

    @abstractmethod
    def map(self, name: str, ttl: float | None = None, max_entries: int = DEFAULT_MAX_ENTRIES,
            clock: Callable[[], float] | None = None) -> SharedMap:
        """The map ``name`` (a short identifier); every worker that opens it sees the same entries.

        Args:
            ttl: seconds an entry lives; None: until the bound pushes it out.
            max_entries: the most entries kept.
            clock: the time source of expiries (tests); ignored by Redis, which keeps its own time.
        """


# ------------------------------------------------------------------- memory


class MemorySharedState(SharedState):
    """One process's memory: shared by its threads, not by other workers.

    Example:
        >>> logits = MemorySharedState().map("refine", ttl=300, max_entries=128)
        >>> logits.put("img|prompt", b"...")
        >>> logits.get("img|prompt")
        b'...'
    """

    kind = "memory"
    location = "memory"

    def map(self, name, ttl=None, max_entries=DEFAULT_MAX_ENTRIES, clock=None) -> SharedMap:
        return _MemoryMap(ttl, max_entries, clock or time.monotonic)


class _MemoryMap(SharedMap):
    def __init__(self, ttl: float | None, max_entries: int, clock: Callable[[], float]):
        self.ttl, self.max_entries, self._clock = ttl, max_entries, clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
        return entry[1] if entry is not None and entry[0] > now else None

    def put(self, key, value):
        now = self._clock()
        expires = now + self.ttl if self.ttl is not None else float("inf")
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (expires, bytes(value))
            # Oldest first, so expired entries and those past the bound leave from the front.
            while self._entries:
                oldest, (oldest_expires, _) = next(iter(self._entries.items()))
                if len(self._entries) <= self.max_entries and oldest_expires > now:
                    break
                del self._entries[oldest]

    def delete(self, key):
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self):
        with self._lock:
            return len(self._entries)


# --------------------------------------------------------------------- disk


class DiskSharedState(SharedState):
    """Maps as directories of files under ``root``, shared by the processes of a host.

    - A write goes to a temp file in the map's directory and is renamed into
      place: a reader sees the old entry or the new one, never a part.
    - ``root`` and the maps' directories are ``0700``, entries ``0600``: only
      the backend's user reads them (they hold Label Studio tokens).
    - An entry's expiry is in its header; a read past it is a miss. Each write
      prunes its map: expired entries, then the oldest past ``max_entries``.

    Args:
        root: the directory (created if missing), by default
            ``<embedding store directory>/shared``.

    Raises:
        StoreError: the directory cannot be created or written.

    Example:
        >>> state = DiskSharedState(tempfile.mkdtemp())
        >>> projects = state.map("projects")
        >>> projects.put("3", b'{"hostname": "http://ls:8080"}')
        >>> DiskSharedState(state.location).map("projects").get("3")  # another worker
        b'{"hostname": "http://ls:8080"}'
    """

    kind = "disk"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.location = str(self.root)
        try:
            _private_dir(self.root)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass  # a read-only mount or a full disk only shows when writing
        except OSError as exc:
            raise StoreError(f"The shared state directory {self.root} is not writable ({exc.strerror or exc})") from None

    def map(self, name, ttl=None, max_entries=DEFAULT_MAX_ENTRIES, clock=None) -> SharedMap:
        directory = self.root / name
        try:
            _private_dir(directory)
        except OSError as exc:
            raise StoreError(f"Cannot create {directory} ({exc.strerror or exc})") from None
        return _FileMap(directory, ttl, max_entries, clock or time.time)


def _private_dir(path: Path) -> None:
    """Create ``path`` readable by its owner only, and tighten an existing one of ours."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if stat.S_IMODE(info.st_mode) != 0o700 and info.st_uid == os.geteuid():
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask; an existing directory keeps its own


class _FileMap(SharedMap):
    def __init__(self, directory: Path, ttl: float | None, max_entries: int, clock: Callable[[], float]):
        self.directory, self.ttl, self.max_entries, self._clock = directory, ttl, max_entries, clock
        self._last_warning = 0.0

    def _path(self, key: str) -> Path:
        return self.directory / _digest(key)

    def get(self, key):
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._warn("read", exc)
            return None
        if len(data) < _HEADER.size:
            return None  # a file emptied by a crash; the next write replaces it
        magic, expires = _HEADER.unpack_from(data)
        if magic != _MAGIC or (expires and expires <= self._clock()):
            return None
        return data[_HEADER.size:]

    def put(self, key, value):
        expires = self._clock() + self.ttl if self.ttl is not None else 0.0
        temp = None
        try:
            # mkstemp creates the file 0600, whatever the umask.
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "wb") as fp:
                fp.write(_HEADER.pack(_MAGIC, expires))
                fp.write(value)
            os.replace(temp, self._path(key))
            temp = None
        except OSError as exc:
            self._warn("write", exc)
            return
        finally:
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
        self._prune()

    def delete(self, key):
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def _entries(self) -> list[tuple[float, str]]:
        """``(mtime, path)`` of every entry; removes temp files of crashed writers."""
        entries = []
        now = time.time()
        try:
            scan = list(os.scandir(self.directory))
        except OSError:
            return entries
        for entry in scan:
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if not entry.name.startswith("."):
                entries.append((mtime, entry.path))
            elif entry.name.endswith(".tmp") and now - mtime > STALE_TEMP_SECONDS:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        return entries

    def _prune(self) -> None:
        # A map holds a few hundred small files at most, so a scan per write is cheap.
        # Expiry by mtime is a wall-clock approximation for clean-up only: reads check the header.
        entries = sorted(self._entries())
        now = time.time()
        excess = len(entries) - self.max_entries
        for i, (mtime, path) in enumerate(entries):
            if i >= excess and (self.ttl is None or now - mtime <= self.ttl):
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _warn(self, what: str, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._last_warning > _WARNING_INTERVAL:
            self._last_warning = now
            logger.warning("Cannot %s the shared state in %s (%s); this worker goes on without it.",
                           what, self.directory, exc)

    def __len__(self):
        return len(self._entries())


# -------------------------------------------------------------------- redis


class RedisSharedState(SharedState):
    """Maps as Redis keys (``sam:shared:<map>:<sha256 of the key>``), shared by every host on that Redis.

    Entries with a time to live are ``SET`` with ``PX``; a sorted set per map
    (``sam:shared:<map>:index``) orders entries by write time so that the
    oldest past ``max_entries`` are deleted. Redis failures are logged once a
    minute and count as misses; after one, Redis is left alone for the
    embedding store's ``RETRY_SECONDS``, so that a hung Redis costs a click one
    socket timeout, not one per command.

    Args:
        client: a ``redis.Redis``.
        location: how logs name it (the URL without its password).

    Example:
        >>> state = RedisSharedState.from_url("redis://cache.internal:6379/0")  # doctest: +SKIP
        >>> state.map("refine", ttl=300, max_entries=128).get("img|prompt") is None  # doctest: +SKIP
        True
    """

    kind = "redis"
    prefix = "sam:shared:"

    def __init__(self, client, location: str):
        self.client = client
        self.location = location
        self._rest = _Rest()  # shared by the maps: one client, one Redis

    @classmethod
    def from_url(cls, url: str) -> "RedisSharedState":
        """Connect as the Redis embedding store does.

        Raises:
            StoreError: the ``redis`` package is missing, the URL is malformed, or Redis does not answer.
        """
        from sam_backend.embeddings.redis_store import RedisStore

        store = RedisStore.from_url(url)
        return cls(store.client, store.location)

    def map(self, name, ttl=None, max_entries=DEFAULT_MAX_ENTRIES, clock=None) -> SharedMap:
        return _RedisMap(self.client, f"{self.prefix}{name}:", self.location, ttl, max_entries, self._rest)


class _Rest:
    """When Redis failed last: until ``RETRY_SECONDS`` later it is not asked (reads miss, writes are skipped)."""

    def __init__(self):
        self.until = 0.0

    def resting(self) -> bool:
        return time.monotonic() < self.until

    def failed(self) -> None:
        from sam_backend.embeddings.redis_store import RETRY_SECONDS

        self.until = time.monotonic() + RETRY_SECONDS


class _RedisMap(SharedMap):
    def __init__(self, client, prefix: str, location: str, ttl: float | None, max_entries: int,
                 rest: _Rest | None = None):
        self.client, self.prefix, self.location = client, prefix, location
        self.ttl, self.max_entries = ttl, max_entries
        self.index = prefix + "index"
        self._last_warning = 0.0
        self._rest = rest or _Rest()

    def _key(self, key: str) -> str:
        return self.prefix + _digest(key)

    def get(self, key):
        return self.get_many([key])[0]

    def get_many(self, keys):
        names = [self._key(key) for key in keys]
        if not names or self._rest.resting():
            return [None] * len(names)
        try:
            return list(self.client.mget(names))
        except Exception as exc:  # redis.RedisError, without importing redis here
            self._warn("read", exc)
            return [None] * len(names)

    def put(self, key, value):
        if self._rest.resting():
            return
        name = self._key(key)
        now = time.time()
        try:
            pipe = self.client.pipeline(transaction=False)
            if self.ttl is not None:
                pipe.set(name, value, px=max(1, int(self.ttl * 1000)))
                pipe.zremrangebyscore(self.index, "-inf", now - self.ttl)  # their keys expired by themselves
            else:
                pipe.set(name, value)
            pipe.zadd(self.index, {name: now})
            pipe.zcard(self.index)
            count = pipe.execute()[-1]
            if count > self.max_entries:
                oldest = [member for member, _ in self.client.zpopmin(self.index, count - self.max_entries)]
                if oldest:
                    self.client.delete(*oldest)
        except Exception as exc:
            self._warn("write", exc)

    def delete(self, key):
        if self._rest.resting():
            return
        name = self._key(key)
        try:
            self.client.pipeline(transaction=False).delete(name).zrem(self.index, name).execute()
        except Exception as exc:
            self._warn("delete", exc)

    def __len__(self):
        if self._rest.resting():
            return 0
        try:
            if self.ttl is not None:
                self.client.zremrangebyscore(self.index, "-inf", time.time() - self.ttl)
            return int(self.client.zcard(self.index))
        except Exception as exc:
            self._warn("count", exc)
            return 0

    def _warn(self, what: str, exc: Exception) -> None:
        self._rest.failed()
        now = time.monotonic()
        if now - self._last_warning > _WARNING_INTERVAL:
            self._last_warning = now
            logger.warning("Redis at %s failed to %s shared state (%s); this worker goes on without it "
                           "and tries Redis again in a while.", self.location, what, exc)


# ------------------------------------------------------------------ records


class SharedRecords(Generic[R]):
    """Dataclass records by key, as JSON in a :class:`SharedMap`: a dict that every worker shares.

    Only the dict operations the backend uses: ``get``, ``[]``, ``[] =``,
    ``in``, ``del``. Fields a stored record has and the dataclass no longer
    has are ignored, so an upgrade reads what the previous version wrote.

    Example:
        >>> @dataclasses.dataclass
        ... class Setup:
        ...     hostname: str | None = None
        >>> setups = SharedRecords(MemorySharedState().map("projects"), Setup)
        >>> setups["3"] = Setup("http://ls:8080")
        >>> setups.get("3"), setups.get("4")
        (Setup(hostname='http://ls:8080'), None)
    """

    def __init__(self, entries: SharedMap, record_type: type[R]):
        self.entries = entries
        self.record_type = record_type
        self._fields = {f.name for f in dataclasses.fields(record_type)}

    def get(self, key: str, default: R | None = None) -> R | None:
        data = self.entries.get(key)
        if data is None:
            return default
        try:
            values = json.loads(data)
            return self.record_type(**{k: v for k, v in values.items() if k in self._fields})
        except (ValueError, TypeError, AttributeError) as exc:
            logger.warning("Ignoring an unreadable shared %s for %r: %s", self.record_type.__name__, key, exc)
            return default

    def __getitem__(self, key: str) -> R:
        record = self.get(key)
        if record is None:
            raise KeyError(key)
        return record

    def __setitem__(self, key: str, record: R) -> None:
        self.entries.put(key, json.dumps(dataclasses.asdict(record)).encode("utf-8"))

    def __delitem__(self, key: str) -> None:
        self.entries.delete(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None


# ------------------------------------------------------------------ choice


def open_shared_state(cache_dir: str | None = None, url: str | None = None) -> SharedState:
    """The shared state that mirrors the embedding store's choice.

    ``url`` (default ``SAM_CACHE_URL``) selects Redis; otherwise files under
    ``<cache_dir>/shared`` (default the embedding store's directory,
    :func:`~sam_backend.embeddings.settings.default_cache_dir`), even when the
    store itself is off (``SAM_DISK_CACHE_MB=0``): this state is small and
    workers need it to agree. When neither can be used, one process's memory,
    with a warning.

    Example:
        >>> state = open_shared_state("/var/cache/sam")  # doctest: +SKIP
        >>> state.kind, state.location  # doctest: +SKIP
        ('disk', '/var/cache/sam/shared')
    """
    from sam_backend.embeddings.settings import default_cache_dir

    url = url if url is not None else (os.environ.get("SAM_CACHE_URL") or None)
    try:
        if url:
            state: SharedState = RedisSharedState.from_url(url)
        else:
            state = DiskSharedState(Path(cache_dir or default_cache_dir()) / "shared")
    except StoreError as exc:
        logger.warning("%s. Project set-ups and refinement state are kept in this worker's memory: with "
                       "several workers, a click may miss what another worker was told.", str(exc).rstrip("."))
        return MemorySharedState()
    logger.info("Shared state (project set-ups, refinement) in %s (%s)", state.location, state.kind)
    return state
