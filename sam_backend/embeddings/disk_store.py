"""The disk store: embeddings as files shared by the worker processes of one host."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from sam_backend.embeddings.store import (
    FORMAT_VERSION,
    LOCK_TIMEOUT_SECONDS,
    CorruptEntryError,
    StoredEmbedding,
    StoreStats,
    decode_entry,
    encode_entry,
)
from sam_backend.errors import StoreError

logger = logging.getLogger(__name__)

#: The size of a disk store is re-measured at least this often, so that
#: entries written by other workers count against the budget; also at every
#: write once the store is nearly full (measuring costs a ``stat`` per entry).
RESCAN_SECONDS = 10.0
RESCAN_FILL = 0.9
#: Temp files older than this are left-overs of a crashed writer.
STALE_TEMP_SECONDS = 3600.0

_KEY_RE = re.compile(r"^[0-9a-f]{8,64}/[0-9a-f]{40}$")
_MIB = 1024 * 1024


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
        return self._write(key, encode_entry(entry))

    def _write(self, key: str, data: bytes) -> bool:
        """Write an encoded entry atomically, then keep the store within its budget."""
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

    def put_spare(self, key: str, entry: StoredEmbedding, protect_seconds: float) -> bool:
        """:meth:`put` an entry nobody has used yet (a look-ahead), if it costs no recently used entry.

        Written only if the store has room, or if the entries that eviction
        would delete for it were all unused for ``protect_seconds``; it is
        then dated as used ``protect_seconds`` ago, so that eviction takes it
        before anything used since (a read or a touch dates it anew).
        """
        data = encode_entry(entry)
        size = len(data)
        with self._lock:
            known = self._known_bytes
        if known is None or known + size > self.budget_bytes:
            entries = list(self._scan())
            needed = sum(stat.st_size for _, stat in entries) + size - self.budget_bytes
            recent = time.time() - protect_seconds
            if needed > sum(stat.st_size for _, stat in entries if stat.st_mtime < recent):
                return False
        if not self._write(key, data):
            return False
        dated = time.time() - protect_seconds
        with contextlib.suppress(OSError):
            os.utime(self._path(key), (dated, dated))
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
            yield fd is not None
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
                if timeout > 0:  # a caller that asked not to wait knows
                    logger.warning("Waited %.0fs for another worker to encode the image of %s; encoding it here.",
                                   timeout, path.name)
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
