"""Which embedding store the settings select: disk, Redis, or none."""

from __future__ import annotations

import logging
import os
import tempfile

from sam_backend.embeddings.disk_store import DiskStore
from sam_backend.embeddings.store import DEFAULT_DISK_BUDGET_MB, EmbeddingStore
from sam_backend.errors import StoreError

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024


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
            from sam_backend.embeddings.redis_store import RedisStore

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
