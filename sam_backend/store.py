"""Persistent embedding stores: embeddings that outlive a request, a worker and a restart.

The in-memory LRU (:mod:`sam_backend.cache`) is per process; a store sits
behind it and is shared by every worker of a host (:class:`DiskStore`, on
local disk) or by several hosts (:class:`~sam_backend.redis_store.RedisStore`).
Entries are ``.npz`` files of the float16 features with the image geometry,
keyed by the preset fingerprint and the image identity
(:mod:`sam_backend.fingerprints`).

Nothing here knows about torch, keras or HTTP: entries are numpy arrays.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from sam_backend.errors import StoreError

logger = logging.getLogger(__name__)

#: Version of the entry format (the ``.npz`` layout and the key scheme).
FORMAT_VERSION = 1
#: Default size budget of a disk store (``SAM_DISK_CACHE_MB`` overrides it):
#: about 5,000 ViT-B embeddings of 2 MiB each.
DEFAULT_DISK_BUDGET_MB = 10240
#: How long a worker waits for another one encoding the same image before it
#: encodes the image itself (a crashed worker releases its lock at once).
LOCK_TIMEOUT_SECONDS = 600.0
#: The size of a disk store is re-measured at least this often, so that
#: entries written by other workers count against the budget; also at every
#: write once the store is nearly full (measuring costs a ``stat`` per entry).
RESCAN_SECONDS = 10.0
RESCAN_FILL = 0.9
#: Temp files older than this are left-overs of a crashed writer.
STALE_TEMP_SECONDS = 3600.0

_KEY_RE = re.compile(r"^[0-9a-f]{8,64}/[0-9a-f]{40}$")
_MIB = 1024 * 1024


@dataclass(frozen=True)
class StoredEmbedding:
    """An image embedding as stored: float16 features and the image geometry.

    Attributes:
        features: ``(h, w, C)`` float16 array.
        original_size: ``(height, width)`` of the image.
        resized_size: ``(height, width)`` after the longest-side resize.
        input_size: side of the square model input.

    Example:
        >>> e = StoredEmbedding(np.zeros((4, 4, 8), np.float16), (90, 200), (58, 128), 128)
        >>> decode_entry(encode_entry(e)).original_size
        (90, 200)
    """

    features: np.ndarray
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    input_size: int


class CorruptEntryError(StoreError):
    """A stored entry cannot be read back; it is dropped and recomputed."""


def entry_key(fingerprint: str, image_identity: str) -> str:
    """The store key of an image's embedding under a preset: ``<fingerprint>/<image digest>``.

    Example:
        >>> entry_key("ab12cd34ef56ab78", "/data/upload/1/cat.jpg|5be8")[:17]
        'ab12cd34ef56ab78/'
    """
    digest = hashlib.blake2b(image_identity.encode(), digest_size=20).hexdigest()
    return f"{fingerprint[:32]}/{digest}"


def encode_entry(entry: StoredEmbedding) -> bytes:
    """The entry as ``.npz`` bytes (the format of every store)."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        version=np.int32(FORMAT_VERSION),
        features=np.ascontiguousarray(entry.features, dtype=np.float16),
        original_size=np.asarray(entry.original_size, np.int32),
        resized_size=np.asarray(entry.resized_size, np.int32),
        input_size=np.int32(entry.input_size),
    )
    return buffer.getvalue()


def decode_entry(data: bytes) -> StoredEmbedding:
    """Read ``.npz`` bytes back into an entry.

    Raises:
        CorruptEntryError: truncated, not an ``.npz`` of this format, a failed
            CRC, or arrays of the wrong kind.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            version = int(npz["version"])
            features = npz["features"]
            original = tuple(int(v) for v in npz["original_size"])
            resized = tuple(int(v) for v in npz["resized_size"])
            input_size = int(npz["input_size"])
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as exc:
        raise CorruptEntryError(f"unreadable entry ({type(exc).__name__}: {exc})") from None
    if version != FORMAT_VERSION:
        raise CorruptEntryError(f"entry format {version}, expected {FORMAT_VERSION}")
    if features.dtype != np.float16 or features.ndim != 3 or len(original) != 2 or len(resized) != 2:
        raise CorruptEntryError(f"unexpected arrays: features {features.dtype}{features.shape}")
    if min(original + resized) <= 0 or input_size <= 0:
        raise CorruptEntryError(f"impossible sizes {original}, {resized}, {input_size}")
    return StoredEmbedding(features, original, resized, input_size)


@dataclass
class StoreStats:
    """What a store holds.

    Attributes:
        location: a directory or a URL (without its password).
        entries: number of embeddings.
        bytes: their total size.
        budget_bytes: the size limit (None: the backend's own, e.g. Redis ``maxmemory``).
        presets: entries and bytes per preset fingerprint.
    """

    location: str
    entries: int = 0
    bytes: int = 0
    budget_bytes: int | None = None
    presets: dict[str, list[int]] = field(default_factory=dict)


class EmbeddingStore(Protocol):
    """What the engine needs from a persistent store (disk or Redis).

    Example:
        >>> store = DiskStore("/tmp/embeddings", budget_bytes=1 << 30)  # doctest: +SKIP
        >>> with store.lock(key):  # one worker computes, others wait  # doctest: +SKIP
        ...     if store.get(key) is None:
        ...         store.put(key, entry)
    """

    location: str
    tier: str

    def get(self, key: str) -> StoredEmbedding | None:
        """The entry, or None if absent or unreadable (an unreadable entry is deleted)."""

    def put(self, key: str, entry: StoredEmbedding) -> bool:
        """Store the entry atomically; False if it could not be written (logged)."""

    def discard(self, key: str) -> None:
        """Delete the entry if present."""

    def touch(self, key: str) -> None:
        """Mark the entry as just used (it was served from a worker's memory)."""

    def lock(self, key: str) -> contextlib.AbstractContextManager:
        """Exclusive, cross-process lock of ``key`` while its entry is computed."""

    def stats(self) -> StoreStats:
        """Entries and bytes held."""

    def clear(self) -> int:
        """Delete every entry; the number deleted."""


class DiskStore:
    """Embeddings as ``.npz`` files in a directory, shared by the processes of a host.

    - Writes go to a temp file in the entry's directory and are renamed into
      place, so readers never see a partial entry, whoever crashes.
    - Reading an entry refreshes its mtime; when the store grows past
      ``budget_bytes`` the entries with the oldest mtime are deleted (LRU).
    - :meth:`lock` is an ``fcntl.flock`` on a lock file per key, so two
      workers asked for the same new image encode it once.

    Args:
        root: the store directory (created if missing).
        budget_bytes: the most bytes of entries kept.

    Raises:
        StoreError: the directory cannot be created or written.

    Example:
        >>> store = DiskStore(tempfile.mkdtemp(), budget_bytes=64 * 1024 * 1024)
        >>> key = entry_key("ab12cd34ef56ab78", "http://host/cat.jpg|5be8")
        >>> store.put(key, StoredEmbedding(np.zeros((4, 4, 8), np.float16), (90, 200), (58, 128), 128))
        True
        >>> store.get(key).resized_size
        (58, 128)
    """

    #: The tier name in metrics and logs.
    tier = "disk"

    def __init__(self, root: str | os.PathLike, budget_bytes: int):
        self.root = Path(root).expanduser()
        self.location = str(self.root)
        self.budget_bytes = int(budget_bytes)
        self._entries_dir = self.root / f"v{FORMAT_VERSION}"
        self._locks_dir = self.root / "locks"
        try:
            self._entries_dir.mkdir(parents=True, exist_ok=True)
            self._locks_dir.mkdir(parents=True, exist_ok=True)
            # Creating the directories is not enough: a read-only mount or a
            # full disk only shows when writing.
            with tempfile.NamedTemporaryFile(dir=self._entries_dir, prefix=".probe-"):
                pass
        except OSError as exc:
            raise StoreError(f"The embedding store {self.root} is not writable ({exc.strerror or exc})") from None
        self._lock = threading.Lock()
        self._known_bytes: int | None = None
        self._last_scan = 0.0
        self._last_write_warning = 0.0

    # ------------------------------------------------------------- entries

    def _path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"Not a store key: {key!r}")
        preset, digest = key.split("/")
        return self._entries_dir / preset / f"{digest}.npz"

    def get(self, key: str) -> StoredEmbedding | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("Cannot read the stored embedding %s (%s); computing it again.", path, exc)
            return None
        try:
            entry = decode_entry(data)
        except CorruptEntryError as exc:
            logger.warning("Dropping the stored embedding %s: %s; it will be computed again.", path, exc)
            self.discard(key)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used now; eviction goes by mtime
        return entry

    def put(self, key: str, entry: StoredEmbedding) -> bool:
        data = encode_entry(entry)
        if len(data) > self.budget_bytes:
            logger.info("An embedding of %d bytes exceeds the store budget of %d; not stored.", len(data), self.budget_bytes)
            return False
        path = self._path(key)
        temp = None
        try:
            path.parent.mkdir(exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as fp:
                fp.write(data)
                fp.flush()
                os.fsync(fp.fileno())  # the rename must not publish an empty file after a power loss
            os.replace(temp, path)
            temp = None
        except OSError as exc:
            self._warn_write_failure(exc)
            return False
        finally:
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
        with self._lock:
            stale = self._known_bytes is None or time.monotonic() - self._last_scan > RESCAN_SECONDS
            if not stale:
                self._known_bytes += len(data)
            over = stale or self._known_bytes > RESCAN_FILL * self.budget_bytes
        if over:
            self.enforce_budget()
        return True

    def _warn_write_failure(self, exc: OSError) -> None:
        # A full disk fails every write; one warning a minute is enough to say so.
        now = time.monotonic()
        if now - self._last_write_warning > 60:
            self._last_write_warning = now
            hint = " (disk full?)" if exc.errno == errno.ENOSPC else ""
            logger.warning("Cannot write to the embedding store %s%s: %s; serving from memory.", self.root, hint, exc)

    def discard(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def touch(self, key: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(self._path(key))

    # -------------------------------------------------------------- budget

    def _scan(self) -> Iterator[tuple[Path, os.stat_result]]:
        """Every entry with its stat; removes temp files left by crashed writers."""
        now = time.time()
        try:
            presets = list(os.scandir(self._entries_dir))
        except FileNotFoundError:
            return
        for preset in presets:
            if not preset.is_dir(follow_symlinks=False):
                continue
            try:
                files = list(os.scandir(preset.path))
            except FileNotFoundError:  # another process cleared the store
                continue
            for file in files:
                try:
                    stat = file.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if file.name.endswith(".npz"):
                    yield Path(file.path), stat
                elif file.name.endswith(".tmp") and now - stat.st_mtime > STALE_TEMP_SECONDS:
                    with contextlib.suppress(OSError):
                        os.unlink(file.path)

    def enforce_budget(self) -> int:
        """Delete least recently used entries until the store fits its budget; the number deleted."""
        entries = sorted(self._scan(), key=lambda e: (e[1].st_mtime_ns, e[0].name))
        total = sum(stat.st_size for _, stat in entries)
        evicted = 0
        for path, stat in entries:
            if total <= self.budget_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                evicted += 1
            total -= stat.st_size
        if evicted:
            logger.info("Evicted %d embedding(s) from %s to stay within %.0f MB.", evicted, self.root, self.budget_bytes / _MIB)
        with self._lock:
            self._known_bytes = total
            self._last_scan = time.monotonic()
        return evicted

    # ---------------------------------------------------------------- lock

    @contextlib.contextmanager
    def lock(self, key: str, timeout: float = LOCK_TIMEOUT_SECONDS):
        path = self._locks_dir / (key.replace("/", "-") + ".lock")
        fd = _acquire_file_lock(path, timeout)
        try:
            yield
        finally:
            if fd is not None:
                # Unlink before unlocking: a waiter that still holds the old
                # file sees the inode change and opens the path anew.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                os.close(fd)

    # --------------------------------------------------------------- admin

    def stats(self) -> StoreStats:
        stats = StoreStats(location=self.location, budget_bytes=self.budget_bytes)
        for path, stat in self._scan():
            stats.entries += 1
            stats.bytes += stat.st_size
            preset = stats.presets.setdefault(path.parent.name, [0, 0])
            preset[0] += 1
            preset[1] += stat.st_size
        return stats

    def clear(self) -> int:
        count = sum(1 for _ in self._scan())
        for child in list(self._entries_dir.iterdir()):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
        with self._lock:
            self._known_bytes = 0
            self._last_scan = time.monotonic()
        return count


def _acquire_file_lock(path: Path, timeout: float) -> int | None:
    """An exclusively ``flock``-ed descriptor of ``path``, or None after ``timeout`` or on error.

    Polls (rather than blocking in ``flock``) so that the wait can time out.
    """
    deadline = time.monotonic() + timeout
    fd = None
    while True:
        if fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                logger.warning("Cannot create the lock file %s (%s); encoding without a lock.", path, exc)
                return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() > deadline:
                logger.warning("Waited %.0fs for another worker to encode the image of %s; encoding it here.", timeout, path.name)
                os.close(fd)
                return None
            time.sleep(0.05)
            continue
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        # We locked a file that its previous holder has already unlinked.
        os.close(fd)
        fd = None


def default_cache_dir() -> str:
    """``$SAM_CACHE_DIR``, else ``$MODEL_DIR/sam-backend-embeddings``, else the temp dir."""
    explicit = os.environ.get("SAM_CACHE_DIR")
    if explicit:
        return explicit
    return os.path.join(os.environ.get("MODEL_DIR") or tempfile.gettempdir(), "sam-backend-embeddings")


def _budget_from_env() -> float:
    value = os.environ.get("SAM_DISK_CACHE_MB")
    if not value:
        return DEFAULT_DISK_BUDGET_MB
    try:
        return float(value)
    except ValueError:
        raise StoreError(f"SAM_DISK_CACHE_MB must be a number of megabytes (0 turns the disk store off); got {value!r}.") from None


def open_store(cache_dir: str | None = None, budget_mb: float | None = None, url: str | None = None,
               required: bool = False) -> EmbeddingStore | None:
    """The store the environment asks for, or None for memory only.

    ``url`` (default ``SAM_CACHE_URL``): a ``redis://`` URL selects a Redis
    store. Otherwise a :class:`DiskStore` in ``cache_dir`` (default
    :func:`default_cache_dir`) with ``budget_mb`` (default
    ``SAM_DISK_CACHE_MB`` or 10240; 0 turns it off).

    Args:
        required: raise instead of falling back to memory only (for commands
            whose whole point is the store, like ``precompute``).

    Raises:
        StoreError: a malformed setting, or (with ``required``) a store that
            cannot be used.

    Example:
        >>> store = open_store("/var/cache/sam", budget_mb=2048)  # doctest: +SKIP
    """
    url = url if url is not None else (os.environ.get("SAM_CACHE_URL") or None)
    budget = _budget_from_env() if budget_mb is None else float(budget_mb)
    try:
        if url:
            from sam_backend.redis_store import RedisStore

            return RedisStore.from_url(url)
        if budget <= 0:
            if required:
                raise StoreError("The disk store is turned off (SAM_DISK_CACHE_MB=0).")
            logger.info("Embedding store off: embeddings are kept in memory only.")
            return None
        return DiskStore(cache_dir or default_cache_dir(), int(budget * _MIB))
    except StoreError as exc:
        if required:
            raise
        logger.warning("%s. Embeddings are kept in memory only: they are lost on restart and "
                       "not shared between workers.", str(exc).rstrip("."))
        return None
