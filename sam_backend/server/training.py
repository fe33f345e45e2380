"""Training on Label Studio's events: ``/webhook`` answers at once, a separate process trains.

Label Studio posts to ``/webhook``:

- ``START_TRAINING`` when someone presses "Start Training" in the model's
  settings (``{"action": "START_TRAINING", "project": {...}}``, 100 s timeout);
- every project event once the backend is connected (``ANNOTATION_CREATED``,
  ``ANNOTATIONS_CREATED``, ``ANNOTATION_UPDATED``..., with ``project``,
  ``annotation`` or ``annotation``/``task`` keys, 1 s timeout).

Annotation events are counted per project across workers (in the versions
directory); after ``SAM_TRAIN_EVERY`` of them (default 20; 0: only "Start
Training") a training starts. A training is ``sam-backend train --project ID``
in a child process, started with ``nice`` ``SAM_TRAIN_NICE`` (default 10) and
``SAM_TRAIN_THREADS`` torch threads (default half the CPUs, at least 1): the
operating system runs clicks first, and a crash there never takes a worker
down. One training per project runs at a time (a lock file); when it ends,
the worker that started it reads its outcome for the log and ``/metrics``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

from prometheus_client import Counter, Gauge

from sam_backend.env import env_number
from sam_backend.learning.versions import VersionStore

logger = logging.getLogger(__name__)

#: Annotation events between two automatic trainings (``SAM_TRAIN_EVERY``; 0: only "Start Training").
DEFAULT_TRAIN_EVERY = 20
#: The training process's niceness (``SAM_TRAIN_NICE``).
DEFAULT_NICE = 10
#: Events that bring new or changed annotations.
ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")


def default_threads() -> int:
    """Half the CPUs this process may use, at least 1: the rest stays with the clicks."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)


def event_project(body: dict) -> int | None:
    """The project id of a webhook body (``project`` as an object or an id, else the annotation's or task's).

    Example:
        >>> event_project({"action": "START_TRAINING", "project": {"id": 7, "title": "Cells"}})
        7
        >>> event_project({"action": "ANNOTATION_CREATED", "annotation": {"id": 3, "project": 4}})
        4
    """
    candidates = [body.get("project")]
    for key in ("annotation", "task"):
        item = body.get(key)
        if isinstance(item, dict):
            candidates.append(item.get("project"))
    annotations = body.get("annotations")
    if isinstance(annotations, list) and annotations and isinstance(annotations[0], dict):
        candidates.append(annotations[0].get("project"))
    for candidate in candidates:
        if isinstance(candidate, dict):
            candidate = candidate.get("id")
        if isinstance(candidate, int) and not isinstance(candidate, bool):
            return candidate
        if isinstance(candidate, str) and candidate.split(".")[0].isdigit():
            return int(candidate.split(".")[0])
    return None


class TrainingService:
    """Starts and watches the trainings a server's events ask for.

    Args:
        backend: the :class:`~sam_backend.server.backend.SamBackend` (its preset, credentials and versions).
        every: annotation events between automatic trainings (default ``SAM_TRAIN_EVERY``).
        threads: the training process's torch threads (default ``SAM_TRAIN_THREADS``).
        nice: its niceness (default ``SAM_TRAIN_NICE``).

    Example:
        >>> service = TrainingService(backend)  # doctest: +SKIP
        >>> service.handle({"action": "START_TRAINING", "project": {"id": 12}})  # doctest: +SKIP
        {'status': 'started', 'project': 12, 'job': 'train-p12-1733551200', 'message': '...'}
    """

    def __init__(self, backend, every: int | None = None, threads: int | None = None, nice: int | None = None):
        self.backend = backend
        self.every = int(every if every is not None else env_number("SAM_TRAIN_EVERY", DEFAULT_TRAIN_EVERY))
        self.threads = int(threads if threads is not None else env_number("SAM_TRAIN_THREADS", default_threads()))
        self.nice = int(nice if nice is not None else env_number("SAM_TRAIN_NICE", DEFAULT_NICE))
        self.runs = Counter("sam_training_runs", "Trainings by outcome (accepted, rejected, skipped, failed) and cause",
                            ["outcome", "cause"], registry=None)
        self.refused = Counter("sam_training_not_started", "Trainings asked for but not started, by reason",
                               ["reason"], registry=None)
        self.running = Gauge("sam_training_running", "Trainings started by the workers that are running",
                             registry=None, multiprocess_mode="livesum")
        self._children: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()

    @property
    def versions(self) -> VersionStore | None:
        return self.backend.decoders.store

    def collect(self):
        """The training counters, for a registry collector."""
        for metric in (self.runs, self.refused, self.running):
            yield from metric.collect()

    def handle(self, body: dict) -> dict:
        """Answer a ``/webhook`` body at once; a training, when due, starts in the background.

        Never raises for an event: Label Studio only logs a webhook's error,
        so a versions directory that cannot be written is logged here and
        counted (``sam_training_not_started{reason="versions_dir"}``).
        """
        try:
            return self._handle(body)
        except OSError as exc:
            self.refused.labels("versions_dir").inc()
            logger.error("Webhook %s: the versions directory cannot be used: %s", body.get("action"), exc)
            return {"status": "not started", "message": f"the versions directory cannot be used: {exc}"}

    def _handle(self, body: dict) -> dict:
        action = body.get("action")
        project = event_project(body)
        if action == "START_TRAINING":
            if project is None:
                return {"status": "ignored", "message": "START_TRAINING without a project id"}
            if self.versions is not None:
                self.versions.count_pending(project, reset=True)
            return self.start(project, "Start Training")
        if action in ANNOTATION_EVENTS and project is not None and self.versions is not None and self.every > 0:
            added = len(body["annotations"]) if isinstance(body.get("annotations"), list) else 1
            count = self.versions.count_pending(project, add=added)
            if count >= self.every:
                self.versions.count_pending(project, reset=True)
                return self.start(project, f"{count} new annotations")
            return {"status": "counted", "project": project,
                    "message": f"{count} of {self.every} annotations before the next training"}
        return {"status": "ignored", "action": action}

    def start(self, project: int, why: str) -> dict:
        """Start ``sam-backend train --project`` for ``project`` unless one is running or it cannot."""
        problem = self._cannot_start(project)
        if problem is not None:
            reason, message = problem
            self.refused.labels(reason).inc()
            logger.warning("Project %s: training not started (%s): %s", project, why, message)
            return {"status": "not started", "project": project, "message": message}
        credentials = self.backend.credentials_for(project)
        env = dict(os.environ, LABEL_STUDIO_URL=credentials.hostname, LABEL_STUDIO_API_KEY=credentials.token,
                   SAM_VERSIONS_DIR=str(self.versions.root))
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # its encodes are not the server's: they stay out of /metrics
        command = [sys.executable, "-m", "sam_backend", "train", "--project", str(project),
                   "--preset", self.backend.preset, "--threads", str(self.threads), "--nice", str(self.nice),
                   "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel())]
        started = time.time()
        with self._lock:
            child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
            self._children[project] = child
        self.running.inc()
        job = f"train-p{project}-{int(started)}"
        logger.info("Project %s: training started (%s), process %d, %d thread(s) at nice %d", project, why, child.pid,
                    self.threads, self.nice)
        threading.Thread(target=self._watch, args=(project, child, started), name=f"sam-train-{project}", daemon=True).start()
        return {"status": "started", "project": project, "job": job,
                "message": f"training project {project} in the background ({why})"}

    def _cannot_start(self, project: int) -> tuple[str, str] | None:
        if self.versions is None:
            return "no_versions_dir", "no versions directory is configured"
        credentials = self.backend.credentials_for(project)
        if not (credentials.hostname and credentials.token):
            return "no_credentials", ("training reads the annotations from Label Studio: set LABEL_STUDIO_URL and "
                                      "LABEL_STUDIO_API_KEY (a personal access token)")
        with self._lock:
            child = self._children.get(project)
        if (child is not None and child.poll() is None) or self.versions.is_training(project):
            return "busy", f"project {project} is already training"
        return None

    def _watch(self, project: int, child: subprocess.Popen, started: float) -> None:
        code = child.wait()
        self.running.dec()
        outcome = self.versions.last_outcome(project)
        status = outcome.get("status") if outcome.get("finished", 0) >= started else None
        if status is None:  # killed, or crashed before it could say why
            status, cause = "failed", "process_exit"
            reason = f"the training process exited with status {code} without an outcome"
        else:
            reason, cause = outcome.get("reason"), outcome.get("cause", "error")
        self.runs.labels(status, cause).inc()
        engine = self.backend.holder.loaded_engine
        if status == "accepted" and engine is not None:
            try:
                self.backend.decoders.preload(engine, project)  # this worker's next prediction carries it
            except Exception:  # the next request loads it instead
                logger.exception("Project %s: the new version could not be loaded ahead of its next request", project)
        if status == "failed":
            logger.error("Project %s: training failed: %s; the current version stays in use", project, reason)
        else:
            logger.info("Project %s: training %s: %s", project, status, reason)
        with self._lock:
            if self._children.get(project) is child:
                del self._children[project]

    def wait_idle(self, timeout: float = 600.0) -> bool:
        """Block until this worker's trainings have ended (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                children = list(self._children.values())
            if not children:
                return True
            time.sleep(0.05)
        return False

