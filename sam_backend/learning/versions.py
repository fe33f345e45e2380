"""A project's trained decoder versions on disk, and which one is in use.

Layout, under ``SAM_VERSIONS_DIR`` (default ``$MODEL_DIR/sam-backend-versions``)::

    <preset>/project-<id>/v3/decoder.npz     prompt encoder + mask decoder weights (no encoder)
    <preset>/project-<id>/v3/version.json    figures, accepted or rejected and why, sha256 of the weights
    <preset>/project-<id>/current.json       {"version": 3, "pinned": false}
    <preset>/project-<id>/training.lock      held by the one training of the project
    <preset>/project-<id>/pending.json       annotations seen since the last training

Every write goes to a temporary name first and is renamed into place: a
version directory appears whole or not at all, and ``current.json`` names
only a version that is already there. A version whose weights do not match
their checksum is never loaded. Every server worker, command and Ray actor
reads the same files, so all use the project's current version.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from sam_backend.errors import SamBackendError

logger = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"^v(\d+)$")


class VersionError(SamBackendError):
    """A version cannot be read, written or pinned."""


class TrainingBusy(SamBackendError):
    """Another training of the same project holds its lock."""


def default_versions_dir() -> str:
    """``$SAM_VERSIONS_DIR``, else ``$MODEL_DIR/sam-backend-versions``, else ``~/.local/share/sam-backend/versions``."""
    explicit = os.environ.get("SAM_VERSIONS_DIR")
    if explicit:
        return explicit
    if os.environ.get("MODEL_DIR"):
        return os.path.join(os.environ["MODEL_DIR"], "sam-backend-versions")
    return os.path.join(os.path.expanduser("~"), ".local", "share", "sam-backend", "versions")


@dataclass
class VersionInfo:
    """One trained version of a project's decoder.

    Attributes:
        project: the Label Studio project id.
        number: 1, 2, 3... in the order they were trained (rejected ones included).
        name: the ``model_version`` Label Studio shows, e.g. ``sam_base_sa1b@sam-backend-0.4.0+p12.v3``.
        accepted: passed the gate (better on the held-out tasks than the version it would replace).
        reason: why it was accepted or rejected, in words.
        before, after: held-out scores of the version in use and of this one (``Scores.as_dict``).
        details: what it was trained on and how long it took.
        created: Unix time.
        sha256: of ``decoder.npz``.
    """

    project: int
    number: int
    name: str
    accepted: bool
    reason: str
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    created: float = 0.0
    sha256: str = ""


class VersionStore:
    """The decoder versions of every project, for one preset.

    Args:
        root: the versions directory (:func:`default_versions_dir`).
        preset: the preset's name (versions of another preset are kept apart).
        base_version: the preset's own ``model_version``; a project's versions extend it.

    Example:
        >>> store = VersionStore("/data/models/sam-backend-versions", "demo", "demo@sam-backend-0.4.0")  # doctest: +SKIP
        >>> info = store.save(12, engine.decoder_weights(), accepted=True, reason="held-out IoU 0.71 -> 0.83")  # doctest: +SKIP
        >>> store.current(12).name  # doctest: +SKIP
        'demo@sam-backend-0.4.0+p12.v1'
    """

    def __init__(self, root: str | os.PathLike, preset: str, base_version: str):
        self.root = Path(root)
        self.preset = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.normpath(preset)) or preset)
        self.base_version = base_version

    def project_dir(self, project: int) -> Path:
        return self.root / self.preset / f"project-{int(project)}"

    def name_for(self, project: int, number: int) -> str:
        return f"{self.base_version}+p{int(project)}.v{number}"

    # ------------------------------------------------------------ reading

    def versions(self, project: int) -> list[VersionInfo]:
        """Every complete version of the project, oldest first (rejected ones too)."""
        directory = self.project_dir(project)
        found = []
        if not directory.is_dir():
            return found
        for entry in directory.iterdir():
            match = _VERSION_DIR.match(entry.name)
            if not match:
                continue
            info = self._read_info(entry)
            if info is not None:
                found.append(info)
        return sorted(found, key=lambda info: info.number)

    def projects(self) -> list[int]:
        """The projects with a version directory."""
        base = self.root / self.preset
        if not base.is_dir():
            return []
        return sorted(int(p.name.split("-", 1)[1]) for p in base.iterdir() if re.match(r"^project-\d+$", p.name))

    def _read_info(self, directory: Path) -> VersionInfo | None:
        try:
            return VersionInfo(**json.loads((directory / "version.json").read_text()))
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("Ignoring %s: its version.json cannot be read (%s)", directory, exc)
            return None

    def current(self, project: int) -> VersionInfo | None:
        """The version in use (None: the preset's own decoder); :meth:`pointer` says whether it is pinned."""
        number = self.pointer(project).get("version")
        if not number:
            return None
        info = self._read_info(self.project_dir(project) / f"v{int(number)}")
        if info is None:
            logger.error("Project %s: current.json names version %s, which cannot be read; using the preset", project,
                         number)
        return info

    def pointer(self, project: int) -> dict:
        """``current.json``: ``{"version": n, "pinned": bool}``, or ``{}``."""
        try:
            pointer = json.loads((self.project_dir(project) / "current.json").read_text())
            return pointer if isinstance(pointer, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.error("Project %s: current.json cannot be read (%s); using the preset", project, exc)
            return {}

    def pointer_stamp(self, project: int) -> tuple:
        """What changes when the project's version in use changes (cheap: one ``stat``)."""
        try:
            stat = (self.project_dir(project) / "current.json").stat()
            return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            return ()

    def load_weights(self, info: VersionInfo) -> list[np.ndarray]:
        """The version's decoder weights, checked against their checksum.

        Raises:
            VersionError: missing, corrupt or altered.
        """
        path = self.project_dir(info.project) / f"v{info.number}" / "decoder.npz"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise VersionError(f"version {info.name} cannot be read: {exc}") from None
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise VersionError(f"version {info.name} is corrupt: {path} does not match its checksum")
        import io

        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return [arrays[f"w{i:04d}"] for i in range(len(arrays.files))]

    # ------------------------------------------------------------ writing

    def save(self, project: int, weights: list[np.ndarray], accepted: bool, reason: str, before: dict | None = None,
             after: dict | None = None, details: dict | None = None) -> VersionInfo:
        """Write the next version (whole, or nothing) and, if ``accepted``, make it current unless a version is pinned.

        Call under :meth:`training_lock`: numbers are taken in order.

        Raises:
            VersionError: it cannot be written (a full disk...); nothing changes.
        """
        directory = self.project_dir(project)
        numbers = [int(m.group(1)) for p in (directory.iterdir() if directory.is_dir() else [])
                   if (m := _VERSION_DIR.match(p.name))]
        number = max(numbers, default=0) + 1
        buffer = _npz_bytes(weights)
        info = VersionInfo(project=int(project), number=number, name=self.name_for(project, number),
                           accepted=accepted, reason=reason, before=before or {}, after=after or {},
                           details=details or {}, created=time.time(), sha256=hashlib.sha256(buffer).hexdigest())
        staging = directory / f".v{number}.tmp-{os.getpid()}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            _write_synced(staging / "decoder.npz", buffer)
            _write_synced(staging / "version.json", json.dumps(asdict(info), indent=1).encode())
            os.rename(staging, directory / f"v{number}")
            if accepted and not self.pointer(project).get("pinned"):
                self._point(project, number, pinned=False)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise VersionError(f"version {info.name} could not be written to {directory}: {exc}") from exc
        return info

    def pin(self, project: int, number: int | None) -> VersionInfo | None:
        """Use version ``number`` from now on, whatever later trainings find; None unpins (the newest accepted).

        Raises:
            VersionError: no such version.
        """
        if number is None:
            accepted = [v for v in self.versions(project) if v.accepted]
            if accepted:
                self._point(project, accepted[-1].number, pinned=False)
                return accepted[-1]
            (self.project_dir(project) / "current.json").unlink(missing_ok=True)
            return None
        info = next((v for v in self.versions(project) if v.number == number), None)
        if info is None:
            raise VersionError(f"project {project} has no version {number}; `sam-backend versions --project "
                               f"{project}` lists them")
        self._point(project, number, pinned=True)
        return info

    def _point(self, project: int, number: int, pinned: bool) -> None:
        _replace_whole(self.project_dir(project) / "current.json", json.dumps({"version": number, "pinned": pinned}))

    def discard_partial(self, project: int) -> int:
        """Remove what an interrupted training left half-written (under :meth:`training_lock`); how many."""
        directory = self.project_dir(project)
        stale = [p for p in directory.glob(".v*.tmp-*")] if directory.is_dir() else []
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)

    # ------------------------------------------------------------ coordination

    @contextlib.contextmanager
    def training_lock(self, project: int) -> Iterator[None]:
        """Held for the whole of one training of ``project``, across processes.

        Raises:
            TrainingBusy: another training of the project holds it.
        """
        directory = self.project_dir(project)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "training.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TrainingBusy(f"project {project} is already training") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def is_training(self, project: int) -> bool:
        """Whether a training of ``project`` holds its lock now."""
        try:
            with self.training_lock(project):
                return False
        except TrainingBusy:
            return True

    def count_pending(self, project: int, add: int = 1, reset: bool = False) -> int:
        """Add ``add`` new annotations to the project's count (or ``reset`` it to 0); the count, across processes."""
        directory = self.project_dir(project)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "pending.json"
        with open(directory / "pending.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    count = int(json.loads(path.read_text()).get("annotations", 0))
                except (OSError, ValueError, AttributeError):
                    count = 0
                count = 0 if reset else count + add
                _replace_whole(path, json.dumps({"annotations": count}))
                return count
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def record_outcome(self, project: int, outcome: dict) -> None:
        """The last training's outcome (``last_training.json``), for the server that started it."""
        try:
            _replace_whole(self.project_dir(project) / "last_training.json", json.dumps(outcome))
        except OSError as exc:
            logger.warning("Project %s: the training outcome could not be written: %s", project, exc)

    def last_outcome(self, project: int) -> dict:
        try:
            return json.loads((self.project_dir(project) / "last_training.json").read_text())
        except (OSError, ValueError):
            return {}


def _npz_bytes(weights: list[np.ndarray]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **{f"w{i:04d}": np.asarray(w) for i, w in enumerate(weights)})
    return buffer.getvalue()


def _replace_whole(path: Path, text: str) -> None:
    """Write ``path`` under a temporary name, then rename it into place: readers see the old file or the new one."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_synced(temporary, text.encode())
    os.replace(temporary, path)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
