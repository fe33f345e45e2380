"""``sam-backend preannotate``: masks for every task of a Label Studio project, resumable.

:class:`PrelabelJob` is what the run does with a task: it skips those that
already have a prediction of the current model version (so a second run after
an interruption goes on where the first stopped), computes masks exactly as
"Retrieve predictions" does (:meth:`SamBackend.prelabel`, in a
:class:`PrelabelWorker`), and uploads them in batches. A task that fails is
recorded with its reason and the run goes on.
:class:`~sam_backend.commands.runner.ProjectRunner` walks the project (Ctrl-C,
Label Studio going away, progress), with the model in this process or on Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sam_backend.commands.runner import InProcessExecutor, Item, Job, PrefetchedMedia, ProjectRunner, WorkerFailed
from sam_backend.errors import SamBackendError
from sam_backend.labelstudio.api import LabelStudioProject, RunSummary
from sam_backend.labelstudio.concepts import label_phrases
from sam_backend.labelstudio.labelconfig import LabelConfig, parse_label_config
from sam_backend.labelstudio.media import Credentials
from sam_backend.learning.serving import ProjectDecoders
from sam_backend.logs import configure_logging
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


class PrelabelJob(Job):
    """Pre-annotation as a :class:`~sam_backend.commands.runner.Job`: which tasks, their predictions, the uploads.

    Args:
        backend: a :class:`~sam_backend.server.backend.SamBackend`: names the
            model version and holds the credentials; in-process runs use its
            loaded model, Ray actors load the same preset.
        project: the Label Studio project (uploads go there).
        settings: what to predict (mode, automatic mask settings).
        overwrite: recompute tasks that have our prediction, replacing it.
        dry_run: compute but upload nothing.
        batch_size: predictions per upload.
        log_level: the Ray workers' logging level.
    """

    def __init__(self, backend, project: LabelStudioProject, settings: PrelabelSettings, overwrite: bool = False,
                 dry_run: bool = False, batch_size: int = 16, log_level: str = "WARNING"):
        self.backend, self.project, self.settings = backend, project, settings
        self.overwrite, self.dry_run, self.batch_size, self.log_level = overwrite, dry_run, batch_size, log_level
        self.summary = Summary()
        # One decoder version for the whole run, here and in every Ray actor, whatever a training does meanwhile.
        self.decoder = backend.decoders.current_weights(project.project)
        self.version = self.decoder[0] if self.decoder else backend.model_version
        if settings.mode == "concepts":  # SAM 3's predictions: its own model version, no trained decoder
            self.decoder, self.version = None, backend.concept_model_version
        self._uploads: list[dict] = []
        self._replaced: list = []

    def prepare(self, project: LabelStudioProject) -> None:
        self.label_config = project.label_config()
        self.config = parse_label_config(self.label_config)
        self.settings.output.kinds(self.config)  # an output the config cannot take stops the run here, not per task
        if self.settings.mode == "concepts":
            label_phrases(self.config, dict(self.settings.concepts))  # so does a label without a phrase

    def select(self, task: dict) -> Item | None:
        if our_predictions(task, self.version) and not self.overwrite:
            self.summary.skipped += 1
            return None
        url = (task.get("data") or {}).get(self.config.image_key)
        return Item(task["id"], url if isinstance(url, str) else "", task)

    def credentials(self) -> Credentials:
        credentials = self.backend.credentials
        return Credentials(credentials.hostname or self.project.url, credentials.token)

    def local_worker(self, media: PrefetchedMedia) -> "PrelabelWorker":
        from sam_backend.server.backend import SamBackend

        # The loaded model, with the runner's prefetched images for media.
        backend = SamBackend(holder=self.backend.holder, fetcher=media, credentials=self.backend.credentials,
                             decoders=ProjectDecoders.fixed(self.project.project, self.decoder),
                             concepts=self.backend.concepts)
        return PrelabelWorker(backend, self.config, self.settings, self.project.project)

    def remote_worker(self):
        return PrelabelWorker.load, {"preset": self.backend.preset, "credentials": self.backend.credentials,
                                     "project": self.project.project, "label_config": self.label_config,
                                     "settings": self.settings, "log_level": self.log_level, "decoder": self.decoder,
                                     "concept_preset": self.backend.concept_preset}

    def record(self, item: Item, result: dict) -> None:
        if result["error"] is not None:
            self.summary.failed[item.id] = result["error"]
            return
        self._uploads.append({"task": item.id, **result["prediction"]})
        self._replaced += [p["id"] for p in our_predictions(item.task, self.version) if "id" in p]
        if len(self._uploads) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        uploads, replaced, self._uploads, self._replaced = self._uploads, self._replaced, [], []
        upload_predictions(self.project, uploads, replaced, self.summary, self.dry_run)

    def progress(self) -> dict:
        return {"done": self.summary.done, "skipped": self.summary.skipped, "failed": len(self.summary.failed)}


class PrelabelWorker:
    """The per-task work of pre-annotation: :meth:`SamBackend.prelabel`, or the reason it failed.

    Args:
        backend: a :class:`~sam_backend.server.backend.SamBackend` with its model loaded.
        config: the project's parsed label config.
        settings: what to predict.
        project: the project id.

    Example:
        >>> worker = PrelabelWorker.load(PrefetchedMedia(), "demo", Credentials(url, token), 3, xml, PrelabelSettings())  # doctest: +SKIP
        >>> worker(Item(7, "/data/upload/3/a.png", task))["prediction"]["result"]  # doctest: +SKIP
    """

    def __init__(self, backend, config: LabelConfig, settings: PrelabelSettings, project):
        self.backend, self.config, self.settings, self.project = backend, config, settings, project

    @classmethod
    def load(cls, media: PrefetchedMedia, preset: str, credentials: Credentials, project, label_config: str,
             settings: PrelabelSettings, log_level: str = "WARNING", decoder=None,
             concept_preset: str | None = None) -> "PrelabelWorker":
        """A worker with its own model (a Ray actor), loaded as the server loads it, with the run's decoder version.

        In mode ``concepts`` it loads SAM 3 (``concept_preset``) only.

        Raises:
            WorkerFailed: the model cannot be loaded.
        """
        from sam_backend.server.backend import ModelHolder, SamBackend

        configure_logging(log_level)
        concepts = settings.mode == "concepts"
        holder = ModelHolder(preset)
        backend = SamBackend(holder=holder, fetcher=media, credentials=credentials,
                             decoders=ProjectDecoders.fixed(project, decoder),
                             concept_preset=concept_preset if concepts else None)
        loading = backend.concepts if concepts and backend.concepts is not None else holder
        loading.start().wait()
        try:
            backend.concept_tiers() if concepts else holder.engine()
        except SamBackendError as exc:
            raise WorkerFailed(str(exc)) from exc
        return cls(backend, parse_label_config(label_config), settings, project)

    def start_batch(self, items: list[Item]) -> None:
        encode_together(self.backend, [item.task for item in items], self.config, self.project,
                        concepts=self.settings.mode == "concepts")

    def __call__(self, item: Item) -> dict:
        prediction, reason = predict_or_reason(self.backend, item.task, self.config, self.settings, self.project)
        return {"prediction": prediction, "error": reason}


class Preannotator(ProjectRunner):
    """Pre-annotate one project: a :class:`PrelabelJob` walked by a :class:`~sam_backend.commands.runner.ProjectRunner`.

    Args:
        backend: a :class:`~sam_backend.server.backend.SamBackend` (its model
            loaded, unless ``executor`` runs the model elsewhere).
        project: the Label Studio project.
        settings: what to predict (mode, automatic mask settings).
        executor: where the model runs: in this process (default), or a
            :class:`~sam_backend.commands.ray_executor.RayExecutor`.
        view: a data manager view id, to work on its tasks only.
        limit: stop after this many tasks given to the model.
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

    def __init__(self, backend, project: LabelStudioProject, settings: PrelabelSettings, executor=None,
                 view: int | None = None, limit: int | None = None, overwrite: bool = False, dry_run: bool = False,
                 batch_size: int = 16, progress: bool = True):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        job = PrelabelJob(backend, project, settings, overwrite=overwrite, dry_run=dry_run, batch_size=batch_size,
                          log_level=getattr(executor, "log_level", "WARNING"))
        super().__init__(job, project, executor if executor is not None else InProcessExecutor(batch_size),
                         view=view, limit=limit, progress=progress)


def upload_predictions(project: LabelStudioProject, uploads: list[dict], replaced: list, summary: Summary,
                       dry_run: bool = False) -> None:
    """Replace our earlier predictions (ids in ``replaced``) by ``uploads``, and count them in ``summary``.

    A dry run counts without uploading.
    """
    if not dry_run and uploads:
        for prediction_id in replaced:
            project.delete_prediction(prediction_id)
        project.create_predictions(uploads)
    for upload in uploads:
        summary.done += 1
        summary.masks += len(upload["result"])
        summary.empty += not upload["result"]


def predict_or_reason(backend, task: dict, config, settings: PrelabelSettings, project) -> tuple[dict | None, str | None]:
    """``(prediction, None)`` for one task (:meth:`SamBackend.prelabel`), or ``(None, why it failed)``."""
    try:
        return backend.prelabel(task, config, settings, project=project), None
    except SamBackendError as exc:
        logger.warning("Task %s failed: %s", task.get("id"), exc)
        return None, str(exc)
    except Exception as exc:  # a bug must not end a night-long run; it is reported
        logger.exception("Task %s failed", task.get("id"))
        return None, f"{type(exc).__name__}: {exc}"


def encode_together(backend, tasks: list[dict], config, project, concepts: bool = False) -> None:
    """On a GPU, encode a batch's images in one call (each is then a memory-cache hit); SAM 3's if ``concepts``."""
    engine = backend.concept_tiers().engine if concepts else backend.holder.engine()
    if len(tasks) < 2 or not engine.device_name.startswith("cuda"):
        return
    try:
        backend.encode_tasks(tasks, config, project, concepts=concepts)
    except SamBackendError as exc:
        logger.info("Batch encoding skipped (%s); images are encoded one by one", exc)


def our_predictions(task: dict, version: str) -> list[dict]:
    """The task's predictions of model ``version``."""
    return [p for p in task.get("predictions") or [] if isinstance(p, dict) and p.get("model_version") == version]
