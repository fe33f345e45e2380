"""Which decoder answers a project: its current trained version, or the preset's own.

A worker looks at the project's ``current.json`` (one ``stat``, at most every
``recheck_seconds``) before a prediction, and loads a new version's decoder
(a few megabytes) when it changes, so every worker moves to a version within
a second or two of it being accepted, and a restart keeps it. A version that
cannot be loaded (corrupt, another preset's) is reported once and the
previous decoder stays in use.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import numpy as np

from sam_backend.learning.versions import VersionError, VersionStore
from sam_backend.sam.engine import SamEngine

logger = logging.getLogger(__name__)

#: Decoder copies kept loaded (a few MB each): one per project in use.
MAX_LOADED = 16


class ProjectDecoders:
    """The engine (decoder) and ``model_version`` to use for each project.

    Args:
        store: the versions on disk (None: every project uses the preset).
        recheck_seconds: how often a project's ``current.json`` is looked at.

    Example:
        >>> decoders = ProjectDecoders(VersionStore(root, "demo", "demo@sam-backend-0.4.0"))  # doctest: +SKIP
        >>> engine_for_12, version = decoders.engine_for(engine, 12)  # doctest: +SKIP
    """

    def __init__(self, store: VersionStore | None, recheck_seconds: float = 1.0):
        self.store = store
        self.recheck_seconds = recheck_seconds
        self._lock = threading.Lock()
        self._checked: dict[int, tuple[float, tuple, object]] = {}  # project -> (when, stamp, (name, info) | None)
        self._loaded: OrderedDict[str, SamEngine] = OrderedDict()
        self._fixed: dict[int, tuple[str, list[np.ndarray]]] = {}
        self._failed: set[str] = set()
        self._last_good: dict[int, str] = {}
        self._served: set[int] = set()  # projects this worker has answered (a new version loads in the background)
        self._loading: set[str] = set()
        #: Versions that failed to load, with why (for /health and the log).
        self.failures: dict[str, str] = {}

    def fix(self, project: int, name: str, weights: list[np.ndarray]) -> None:
        """Use this version for ``project`` whatever the disk says (a pre-annotation run keeps one version throughout)."""
        self._fixed[int(project)] = (name, weights)

    def current_weights(self, project) -> tuple[str, list[np.ndarray]] | None:
        """``(name, weights)`` of ``project``'s current version (None: the preset's), to hand to other processes.

        Raises:
            VersionError: the current version cannot be read.
        """
        project = _project_number(project)
        if project is None:
            return None
        if project in self._fixed:
            return self._fixed[project]
        if self.store is None:
            return None
        info = self.store.current(project)
        return (info.name, self.store.load_weights(info)) if info is not None else None

    @classmethod
    def fixed(cls, project, decoder: tuple[str, list[np.ndarray]] | None) -> "ProjectDecoders":
        """Decoders that answer ``project`` with ``decoder`` (from :meth:`current_weights`) and nothing else with a version."""
        decoders = cls(None)
        if decoder is not None:
            decoders.fix(_project_number(project), *decoder)
        return decoders

    def engine_for(self, engine: SamEngine, project) -> tuple[SamEngine, str | None]:
        """``(engine, version name)`` for ``project``: its current version's decoder, or ``(engine, None)``.

        When the current version cannot be loaded, the version the project
        used before it (or the preset's decoder) answers. A new version of a
        project this worker already serves is loaded in the background (a
        few hundred milliseconds): until it is ready the decoder before it
        answers, so no click pays for the switch. On a project's first
        request the version is loaded there and then.
        """
        project = _project_number(project)
        if project is None or (self.store is None and project not in self._fixed):
            return engine, None
        if project in self._fixed:
            name, weights = self._fixed[project]
            loader = lambda: weights  # noqa: E731
        else:
            chosen = self._current(project)
            served = project in self._served
            self._served.add(project)
            if chosen is None:
                return engine, None
            name, info = chosen
            loader = lambda: self.store.load_weights(info)  # noqa: E731
            with self._lock:
                ready = name in self._loaded
            if served and not ready:
                self._load_in_background(engine, name, loader)
                return self._previous(engine, project)
        variant = self._variant(engine, name, loader)
        if variant is not None:
            self._last_good[project] = name
            return variant, name
        return self._previous(engine, project)

    def preload(self, engine: SamEngine, project) -> str | None:
        """Load ``project``'s current version now (a training this worker watched was just accepted).

        Returns the name of the version that answers the project now (None: the preset's decoder).

        The project's next prediction in this worker carries it; other
        workers move at their next request, loading it in the background.
        """
        project = _project_number(project)
        if project is None or self.store is None:
            return None
        with self._lock:
            self._checked.pop(project, None)  # look at current.json now, not at the next recheck
        self._served.discard(project)  # as at a first request: loaded now, not in the background
        return self.engine_for(engine, project)[1]

    def _load_in_background(self, engine: SamEngine, name: str, loader) -> None:
        with self._lock:
            if name in self._loading or name in self._failed:
                return
            self._loading.add(name)

        def load():
            try:
                self._variant(engine, name, loader)
            finally:
                with self._lock:
                    self._loading.discard(name)

        threading.Thread(target=load, name="sam-decoder-load", daemon=True).start()

    def _previous(self, engine: SamEngine, project: int) -> tuple[SamEngine, str | None]:
        """The decoder that answered ``project`` last (or the preset's), while its current version is not usable."""
        previous = self._last_good.get(project)
        with self._lock:
            fallback = self._loaded.get(previous) if previous else None
        return (fallback, previous) if fallback is not None else (engine, None)

    def version_for(self, project) -> str | None:
        """The name of the version that answers ``project`` (None: the preset), without loading it."""
        project = _project_number(project)
        if project is None:
            return None
        if project in self._fixed:
            return self._fixed[project][0]
        if self.store is None:
            return None
        chosen = self._current(project)
        if chosen is not None and chosen[0] not in self._failed:
            return chosen[0]
        return self._last_good.get(project)

    def _current(self, project: int):
        now = time.monotonic()
        with self._lock:
            checked = self._checked.get(project)
            if checked is not None and now - checked[0] < self.recheck_seconds:
                return checked[2]
        stamp = self.store.pointer_stamp(project)
        if checked is not None and stamp == checked[1]:
            chosen = checked[2]
        else:
            info = self.store.current(project) if stamp else None
            chosen = (info.name, info) if info is not None else None
            if checked is None or (checked[2] or (None,))[0] != (chosen or (None,))[0]:
                logger.info("Project %s: predictions now come from %s", project,
                            chosen[0] if chosen else "the preset's decoder")
        with self._lock:
            self._checked[project] = (now, stamp, chosen)
        return chosen

    def _variant(self, engine: SamEngine, name: str, weights) -> SamEngine | None:
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            if name in self._failed:
                return None
        try:
            variant = engine.with_decoder(weights())
            variant.prepare_decoder()
        except (VersionError, ValueError, OSError) as exc:
            logger.error("Version %s cannot be used (%s); the previous decoder stays in use", name, exc)
            with self._lock:
                self._failed.add(name)
                self.failures[name] = str(exc)
            return None
        with self._lock:
            self._loaded[name] = variant
            while len(self._loaded) > MAX_LOADED:
                self._loaded.popitem(last=False)
        return variant


def _project_number(project) -> int | None:
    """Label Studio's ``"<id>.<created_at>"``, or an id, as an int (None when there is none)."""
    if project is None:
        return None
    try:
        return int(str(project).split(".")[0])
    except ValueError:
        return None
