"""Iterative refinement: a click that extends the previous prompt starts from its mask.

SAM was trained interactively: each new click came with the low-resolution
logits of the previous prediction as ``mask_input``. Label Studio sends the
whole prompt every time (all smart regions so far), so the backend remembers,
per image and prompt, the best logits for a short while; when a request's
prompt is a remembered one plus one more point or box, those logits go in as
``mask_input``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Callable, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: Seconds a prediction's logits are kept (``SAM_REFINE_SECONDS``; 0 turns refinement off).
DEFAULT_TTL_SECONDS = 300.0
#: Predictions kept at most (a ViT-B logit map is 256 KiB).
DEFAULT_MAX_ENTRIES = 128

Signature = tuple[tuple[tuple[float, float, int], ...], tuple[float, ...] | None]


def prompt_signature(points: Sequence | None, labels: Sequence | None, box: Sequence | None) -> Signature:
    """An order-free, hashable form of a prompt (pixels rounded to 1/100).

    Example:
        >>> prompt_signature([[10, 20.004]], [1], None)
        (((10.0, 20.0, 1),), None)
    """
    pts = tuple(sorted(
        (round(float(x), 2), round(float(y), 2), int(label))
        for (x, y), label in zip(points or [], labels or [])
    ))
    return pts, None if box is None else tuple(round(float(v), 2) for v in box)


def previous_signatures(signature: Signature) -> Iterator[Signature]:
    """The prompts that ``signature`` extends by one point or by its box (non-empty ones only)."""
    points, box = signature
    for i in range(len(points)):
        rest = points[:i] + points[i + 1:]
        if rest or box is not None:
            yield rest, box
    if box is not None and points:
        yield points, None


class RefinementMemory:
    """Recent best low-resolution logits, by image and prompt, for a short time.

    Args:
        ttl_seconds: how long an entry is usable (annotators click within seconds).
        max_entries: the most entries kept; the oldest go first.
        clock: time source (tests pass their own).

    Example:
        >>> memory = RefinementMemory()
        >>> memory.remember("img", prompt_signature([[10, 20]], [1], None), np.zeros((4, 4), np.float32))
        >>> memory.previous("img", prompt_signature([[10, 20], [30, 5]], [1, 0], None)).shape
        (4, 4)
    """

    def __init__(self, ttl_seconds: float = DEFAULT_TTL_SECONDS, max_entries: int = DEFAULT_MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, Signature], tuple[float, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> "RefinementMemory":
        """With ``SAM_REFINE_SECONDS`` as the time to live (default 300; 0: off)."""
        value = os.environ.get("SAM_REFINE_SECONDS")
        try:
            ttl = float(value) if value else DEFAULT_TTL_SECONDS
        except ValueError:
            # A typo in an optional setting should not keep the server from starting.
            logger.warning("SAM_REFINE_SECONDS must be a number of seconds; got %r, using %g.", value, DEFAULT_TTL_SECONDS)
            ttl = DEFAULT_TTL_SECONDS
        return cls(ttl_seconds=ttl)

    @property
    def enabled(self) -> bool:
        return self.ttl_seconds > 0 and self.max_entries > 0

    def remember(self, image_key: str, signature: Signature, logits: np.ndarray) -> None:
        """Keep ``logits`` (the best mask's, ``(h, w)``) for this image and prompt."""
        if not self.enabled:
            return
        now = self._clock()
        with self._lock:
            self._entries.pop((image_key, signature), None)
            self._entries[(image_key, signature)] = (now + self.ttl_seconds, np.array(logits, np.float32))
            while self._entries:
                key, (expires, _) = next(iter(self._entries.items()))
                if len(self._entries) <= self.max_entries and expires > now:
                    break
                del self._entries[key]

    def previous(self, image_key: str, signature: Signature) -> np.ndarray | None:
        """The logits of a live prompt that ``signature`` extends by one region, or None."""
        if not self.enabled:
            return None
        now = self._clock()
        with self._lock:
            for candidate in previous_signatures(signature):
                entry = self._entries.get((image_key, candidate))
                if entry is not None and entry[0] > now:
                    return entry[1]
        return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
