"""Persistent embedding stores: embeddings that outlive a request, a worker and a restart.

The in-memory LRU (:mod:`sam_backend.embeddings.memory`) is per process; a store sits
behind it and is shared by every worker of a host (:class:`DiskStore`, on
local disk) or by several hosts (:class:`~sam_backend.embeddings.redis_store.RedisStore`).
Entries are ``.npz`` files of the float16 features with the image geometry,
keyed by the preset fingerprint and the image identity
(:mod:`sam_backend.embeddings.fingerprints`).

Nothing here knows about torch, keras or HTTP: entries are numpy arrays.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import zipfile
from dataclasses import dataclass, field
from typing import Protocol

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

    def put_spare(self, key: str, entry: StoredEmbedding, protect_seconds: float) -> bool:
        """Store an entry nobody has used yet, only if that evicts nothing used in ``protect_seconds``."""

    def discard(self, key: str) -> None:
        """Delete the entry if present."""

    def touch(self, key: str) -> None:
        """Mark the entry as just used (it was served from a worker's memory)."""

    def lock(self, key: str, timeout: float = ...) -> contextlib.AbstractContextManager[bool]:
        """Exclusive, cross-process lock of ``key`` while its entry is computed.

        Gives whether it was acquired: after ``timeout`` seconds the caller goes
        on without it (a worker that died holding it must not stop the others).
        """

    def stats(self) -> StoreStats:
        """Entries and bytes held."""

    def clear(self) -> int:
        """Delete every entry; the number deleted."""
