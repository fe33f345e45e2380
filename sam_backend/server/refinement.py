"""Iterative refinement: a click that extends the previous prompt starts from its mask.

SAM was trained interactively: each new click came with the low-resolution
logits of the previous prediction as ``mask_input``. Label Studio sends the
whole prompt every time (all smart regions so far), so the backend remembers,
per image and prompt, the best logits for a short while; when a request's
prompt is a remembered one plus one more point or box, those logits go in as
``mask_input``.

The logits live in the workers' shared state
(:mod:`sam_backend.server.shared_state`: files next to the embedding store,
or Redis), so a click refines the previous one whichever worker computed it.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Callable, Iterator, Sequence

import numpy as np

from sam_backend.env import env_number
from sam_backend.server.shared_state import MemorySharedState, SharedState

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

    Entries are ``.npy`` bytes in the map ``refine`` of ``shared``, so every
    worker that opened the same shared state sees them (a ViT-B logit map is
    256 KiB: a read per click is cheap, and nothing is cached in the worker).

    Args:
        ttl_seconds: how long an entry is usable (annotators click within seconds).
        max_entries: the most entries kept; the oldest go first.
        clock: time source of expiries (tests pass their own); default the
            shared state's (wall time on disk, Redis' own time).
        shared: where entries live; default this process's memory.

    Example:
        >>> memory = RefinementMemory()
        >>> memory.remember("img", prompt_signature([[10, 20]], [1], None), np.zeros((4, 4), np.float32))
        >>> memory.previous("img", prompt_signature([[10, 20], [30, 5]], [1, 0], None)).shape
        (4, 4)
    """

    def __init__(self, ttl_seconds: float = DEFAULT_TTL_SECONDS, max_entries: int = DEFAULT_MAX_ENTRIES,
                 clock: Callable[[], float] | None = None, shared: SharedState | None = None):
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self.shared = shared if shared is not None else MemorySharedState()
        self._entries = self.shared.map("refine", ttl=ttl_seconds, max_entries=max(1, max_entries), clock=clock)

    @classmethod
    def from_env(cls, shared: SharedState | None = None) -> "RefinementMemory":
        """With ``SAM_REFINE_SECONDS`` as the time to live (default 300; 0: off), in ``shared``."""
        return cls(ttl_seconds=env_number("SAM_REFINE_SECONDS", DEFAULT_TTL_SECONDS), shared=shared)

    @property
    def enabled(self) -> bool:
        return self.ttl_seconds > 0 and self.max_entries > 0

    def remember(self, image_key: str, signature: Signature, logits: np.ndarray) -> None:
        """Keep ``logits`` (the best mask's, ``(h, w)``) for this image and prompt."""
        if not self.enabled:
            return
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(logits, np.float32), allow_pickle=False)
        self._entries.put(_entry_key(image_key, signature), buffer.getvalue())

    def previous(self, image_key: str, signature: Signature) -> np.ndarray | None:
        """The logits of a live prompt that ``signature`` extends by one region, or None."""
        if not self.enabled:
            return None
        candidates = [_entry_key(image_key, candidate) for candidate in previous_signatures(signature)]
        for data in self._entries.get_many(candidates):
            if data is None:
                continue
            try:
                return np.load(io.BytesIO(data), allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:  # a damaged entry is a miss, not a failed click
                logger.warning("Ignoring unreadable refinement logits: %s", exc)
        return None

    def __len__(self) -> int:
        return len(self._entries)


def _entry_key(image_key: str, signature: Signature) -> str:
    """One string for an image and a prompt (the shared maps hash it into a name)."""
    return json.dumps([image_key, signature], separators=(",", ":"))
