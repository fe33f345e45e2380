"""``sam-backend preannotate``: masks for every task of a Label Studio project, resumable.

It walks the project's tasks through label-studio-sdk, skips those that
already have a prediction of the current model version (so a second run after
an interruption goes on where the first stopped), computes masks exactly as
"Retrieve predictions" does (:meth:`SamBackend.prelabel`), and uploads them in
batches. A task that fails is recorded with its reason and the run goes on;
Ctrl-C stops after the current task, uploads what is done and prints the
summary. On a GPU the images of a batch are encoded together.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

from sam_backend.errors import SamBackendError
from sam_backend.labelstudio.labelconfig import parse_label_config
from sam_backend.labelstudio.api import LabelStudioError, LabelStudioProject, RunSummary
from sam_backend.server.prelabel import PrelabelSettings

logger = logging.getLogger(__name__)


@dataclass
class Summary(RunSummary):
    """What a run did (and :class:`~sam_backend.labelstudio.api.RunSummary`'s failures and interruption).

    Attributes:
        done: tasks given a prediction (uploaded, or computed in a dry run).
        empty: of those, predictions without any mask.
        skipped: tasks that already had a prediction of this model version.
        masks: regions predicted (brush regions, or polygons: one per part of a mask).
        stopped_by: why the run stopped early.
    """

    done: int = 0
    empty: int = 0
    skipped: int = 0
    masks: int = 0
    stopped_by: str | None = None

    def lines(self, dry_run: bool = False) -> list[str]:
        """The summary, for the terminal."""
        verb = "would get" if dry_run else "got"
        rate = f", {self.done / self.seconds:.2f} task/s" if self.seconds and self.done else ""
        lines = [
            f"{self.done} task(s) {verb} a prediction ({self.masks} mask(s); {self.empty} without any){rate}",
            f"{self.skipped} task(s) skipped: they already have a prediction of this model version",
            f"{len(self.failed)} task(s) failed",
        ]
        lines += [f"  task {task}: {reason}" for task, reason in sorted(self.failed.items(), key=lambda i: str(i[0]))]
        if self.interrupted:
            lines.append(f"Stopped early ({self.stopped_by}); run the same command again to go on.")
        return lines


class Preannotator:
    """Pre-annotate one project with a :class:`~sam_backend.server.backend.SamBackend`.

    Args:
        backend: computes predictions (its model must be loaded).
        project: the Label Studio project.
        settings: what to predict (mode, automatic mask settings).
        view: a data manager view id, to work on its tasks only.
        limit: stop after this many tasks given a prediction.
        overwrite: recompute tasks that have our prediction, replacing it.
        dry_run: compute but upload nothing.
        batch_size: tasks per upload (and per encoder call on a GPU).
        progress: show a progress bar.

    Example:
        >>> project = LabelStudioProject("http://localhost:8080", "<token>", 3)  # doctest: +SKIP
        >>> summary = Preannotator(backend, project, PrelabelSettings(mode="auto")).run()  # doctest: +SKIP
        >>> summary.done, summary.skipped, summary.failed  # doctest: +SKIP
        (120, 30, {})
    """

    def __init__(
        self,
        backend,
        project: LabelStudioProject,
        settings: PrelabelSettings,
        view: int | None = None,
        limit: int | None = None,
        overwrite: bool = False,
        dry_run: bool = False,
        batch_size: int = 16,
        progress: bool = True,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.backend, self.project, self.settings = backend, project, settings
        self.view, self.limit, self.overwrite, self.dry_run = view, limit, overwrite, dry_run
        self.batch_size, self.progress = batch_size, progress
        self.stop = threading.Event()

    def run(self) -> Summary:
        """Walk the project once; Ctrl-C (in the main thread) stops after the current task."""
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_interrupt)
            try:
                return self._run()
            finally:
                signal.signal(signal.SIGINT, previous)
        return self._run()

    def _on_interrupt(self, signum, frame) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        logger.warning("Stopping after the current task (Ctrl-C again to stop at once)...")
        self.stop.set()

    def _run(self) -> Summary:
        from tqdm import tqdm

        started = time.monotonic()
        summary = Summary()
        config = parse_label_config(self.project.label_config())
        self.settings.output.kinds(config)  # an output the config cannot take stops the run here, not per task
        version = self.backend.model_version
        total = self.project.count_tasks(self.view)
        bar = tqdm(total=min(total, self.limit) if self.limit else total, unit="task", disable=not self.progress,
                   dynamic_ncols=True, desc=f"project {self.project.project}")
        batch: list[dict] = []
        try:
            for task in self.project.iter_tasks(self.view):
                if self.stop.is_set():
                    summary.interrupted, summary.stopped_by = True, "Ctrl-C"
                    break
                if self.limit is not None and summary.done + len(summary.failed) + len(batch) >= self.limit:
                    break
                if our_predictions(task, version) and not self.overwrite:
                    summary.skipped += 1
                    bar.update(1)
                    continue
                batch.append(task)
                if len(batch) >= self.batch_size:
                    self._process(batch, config, summary, bar)
                    batch = []
            if batch:  # after Ctrl-C, _process uploads nothing more and marks the run interrupted
                self._process(batch, config, summary, bar)
        except LabelStudioError as exc:
            # Retries are spent: Label Studio is down or refuses us. What is
            # uploaded stays; the next run resumes after it.
            logger.error("%s", exc)
            summary.interrupted, summary.stopped_by = True, str(exc)
        finally:
            bar.close()
        summary.seconds = time.monotonic() - started
        return summary

    def _process(self, tasks: list[dict], config, summary: Summary, bar) -> None:
        version = self.backend.model_version
        encode_together(self.backend, tasks, config, self.project.project)
        uploads, replaced = [], []
        for task in tasks:
            if self.stop.is_set():
                summary.interrupted, summary.stopped_by = True, "Ctrl-C"
                break
            prediction, reason = predict_or_reason(self.backend, task, config, self.settings, self.project.project)
            if reason is not None:
                summary.failed[task.get("id")] = reason
            else:
                uploads.append({"task": task["id"], **prediction})
                replaced += [p["id"] for p in our_predictions(task, version) if "id" in p]
            bar.update(1)
        upload_predictions(self.project, uploads, replaced, summary, bar, self.dry_run)


def upload_predictions(project: LabelStudioProject, uploads: list[dict], replaced: list, summary: Summary, bar,
                       dry_run: bool = False) -> None:
    """Replace our earlier predictions (ids in ``replaced``) by ``uploads``, and count them in ``summary``.

    The single-machine run and the Ray run (:mod:`.ray_pipeline`) both upload
    through here; a dry run counts without uploading.
    """
    if not dry_run and uploads:
        for prediction_id in replaced:
            project.delete_prediction(prediction_id)
        project.create_predictions(uploads)
    for upload in uploads:
        summary.done += 1
        summary.masks += len(upload["result"])
        summary.empty += not upload["result"]
    bar.set_postfix(done=summary.done, skipped=summary.skipped, failed=len(summary.failed), refresh=False)


def predict_or_reason(backend, task: dict, config, settings: PrelabelSettings, project) -> tuple[dict | None, str | None]:
    """``(prediction, None)`` for one task (:meth:`SamBackend.prelabel`), or ``(None, why it failed)``.

    The single-machine run and the Ray actors (:mod:`.ray_pipeline`) both
    call it, so a task gets the same prediction, or the same reason, either way.
    """
    try:
        return backend.prelabel(task, config, settings, project=project), None
    except SamBackendError as exc:
        logger.warning("Task %s failed: %s", task.get("id"), exc)
        return None, str(exc)
    except Exception as exc:  # a bug must not end a night-long run; it is reported
        logger.exception("Task %s failed", task.get("id"))
        return None, f"{type(exc).__name__}: {exc}"


def encode_together(backend, tasks: list[dict], config, project) -> None:
    """On a GPU, encode a batch's images in one call (each is then a memory-cache hit)."""
    engine = backend.holder.engine()
    if len(tasks) < 2 or not engine.device_name.startswith("cuda"):
        return
    try:
        backend.encode_tasks(tasks, config, project)
    except SamBackendError as exc:
        logger.info("Batch encoding skipped (%s); images are encoded one by one", exc)


def our_predictions(task: dict, version: str) -> list[dict]:
    """The task's predictions of model ``version``."""
    return [p for p in task.get("predictions") or [] if isinstance(p, dict) and p.get("model_version") == version]
