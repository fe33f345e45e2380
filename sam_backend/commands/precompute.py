"""``sam-backend precompute``: every task image of a project encoded into the store ahead of time.

Run it overnight (or on a GPU machine, then copy the store directory to the
serving host): afterwards the first click on any task costs what the tenth
does. With a concept preset, SAM 3's vision features are stored too (or
alone), so that the first phrase on any task costs only its decode. Images
already stored are skipped, so a second run, or a run after an interruption,
only encodes what is missing; entries are written atomically, so an
interrupted run leaves nothing half-written. :class:`PrecomputeJob` is
what the run does with a task; :class:`~sam_backend.commands.runner.ProjectRunner`
walks the project, with the encoder in this process or on Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sam_backend.commands.runner import (InProcessExecutor, Item, Job, PrefetchedMedia, ProjectRunner, WorkerFailed,
                                         failure_reason)
from sam_backend.embeddings.fingerprints import image_identity
from sam_backend.errors import LabelConfigError, SamBackendError, StoreError
from sam_backend.labelstudio.api import LabelStudioProject, RunSummary
from sam_backend.labelstudio.labelconfig import parse_label_config
from sam_backend.labelstudio.media import Credentials, MediaFetcher
from sam_backend.logs import configure_logging
from sam_backend.sam.images import load_image

if TYPE_CHECKING:
    from sam_backend.embeddings.tiers import EmbeddingTiers

logger = logging.getLogger(__name__)


@dataclass
class PrecomputeSummary(RunSummary):
    """What a run did (and :class:`~sam_backend.labelstudio.api.RunSummary`'s failures and interruption).

    Attributes:
        tasks: tasks seen.
        encoded: images encoded and stored by this run (by at least one of the models).
        stored: images that were already in the store for every model (skipped).
        no_image: tasks without an image URL in their data.
        by_model: per model (``SAM``, ``SAM 3``), images ``encoded`` and ``stored``.
    """

    tasks: int = 0
    encoded: int = 0
    stored: int = 0
    no_image: int = 0
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, model: str, outcome: str) -> None:
        """One image of ``model`` ``encoded`` or ``stored``."""
        self.by_model.setdefault(model, {"encoded": 0, "stored": 0})[outcome] += 1

    def lines(self) -> list[str]:
        """A human summary, one line per fact."""
        lines = [f"{self.tasks} task(s) in {self.seconds:.0f}s: {self.encoded} encoded, "
                 f"{self.stored} already stored, {self.no_image} without an image, {len(self.failed)} failed"]
        if len(self.by_model) > 1:
            lines.append("  " + "; ".join(f"{model}: {counts['encoded']} encoded, {counts['stored']} already stored"
                                          for model, counts in self.by_model.items()))
        lines += [f"  task {task}: {reason}" for task, reason in list(self.failed.items())[:20]]
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more (see the log)")
        if self.interrupted:
            lines.append("Interrupted: run the same command again to resume; stored images are skipped.")
        return lines


def image_data_key(label_config: str) -> str:
    """The task data field with the image URL: the ``<Image value="$...">`` SAM works on.

    Falls back to the first ``<Image>`` when the config is not (yet) usable
    for interactive masks: precomputing does not need the brush.

    Raises:
        LabelConfigError: the config has no ``<Image>``.
    """
    try:
        return parse_label_config(label_config).image_key
    except LabelConfigError as exc:
        from label_studio_sdk.label_interface import LabelInterface

        try:
            images = [obj for obj in LabelInterface(label_config).objects if obj.tag == "Image"]
        except Exception:
            images = []
        if not images:
            raise LabelConfigError(f"{exc} Pass --data-key with the task data field that holds the image URL.") from None
        return (images[0].value or "").lstrip("$") or images[0].name


class PrecomputeJob(Job):
    """Precomputing as a :class:`~sam_backend.commands.runner.Job`: tasks with an image, each stored once per model.

    Args:
        credentials: for task media (Label Studio's URL and token).
        embeddings: SAM's :class:`~sam_backend.embeddings.tiers.EmbeddingTiers`
            with a store, for a run in this process (None: SAM's are not computed here).
        data_key: the task data field with the image URL (default: from the label config).
        preset, device, cache_dir, log_level: how a Ray actor opens its own
            model and store (on a cluster, ``SAM_CACHE_URL`` or a directory
            every node shares); ``preset`` None: the actors skip SAM.
        concepts: SAM 3's tiers with a store, for its vision features in this process.
        concept_preset: the SAM 3 preset a Ray actor loads (None: no SAM 3).
    """

    unit = "image"

    def __init__(self, credentials: Credentials, embeddings: EmbeddingTiers | None = None, data_key: str | None = None,
                 preset: str | None = None, device: str | None = None, cache_dir: str | None = None,
                 log_level: str = "WARNING", concepts: EmbeddingTiers | None = None,
                 concept_preset: str | None = None):
        if any(tiers is not None and tiers.store is None for tiers in (embeddings, concepts)):
            raise StoreError("precompute needs an embedding store; none is configured or it is not writable.")
        self._credentials, self.embeddings, self.concepts, self.data_key = credentials, embeddings, concepts, data_key
        self.preset, self.device, self.cache_dir, self.log_level = preset, device, cache_dir, log_level
        self.concept_preset = concept_preset
        self.summary = PrecomputeSummary()

    def prepare(self, project: LabelStudioProject) -> None:
        self.data_key = self.data_key or image_data_key(project.label_config())
        logger.info("Precomputing the tasks of project %s (image field %r)", project.project, self.data_key)

    def select(self, task: dict) -> Item | None:
        url = (task.get("data") or {}).get(self.data_key)
        if isinstance(url, str) and url:
            return Item(task.get("id"), url, task)
        self.summary.tasks += 1
        self.summary.no_image += 1
        logger.info("Task %s has no %r URL in its data; skipped.", task.get("id"), self.data_key)
        return None

    def credentials(self) -> Credentials:
        return self._credentials

    def local_worker(self, media: PrefetchedMedia) -> "PrecomputeWorker":
        return PrecomputeWorker(self.embeddings, media, concepts=self.concepts)

    def remote_worker(self):
        return PrecomputeWorker.load, {"preset": self.preset, "device": self.device, "cache_dir": self.cache_dir,
                                       "log_level": self.log_level, "concept_preset": self.concept_preset}

    def record(self, item: Item, result: dict) -> None:
        self.summary.tasks += 1
        if result["outcome"] == "encoded":
            self.summary.encoded += 1
        elif result["outcome"] == "stored":
            self.summary.stored += 1
        else:
            self.summary.failed[item.id] = result["error"]
        for model, outcome in result.get("models", {}).items():
            self.summary.count(model, outcome)

    def progress(self) -> dict:
        return {"encoded": self.summary.encoded, "stored": self.summary.stored, "failed": len(self.summary.failed)}


class PrecomputeWorker:
    """The per-task work of precomputing: the task's image into the store for each model, unless it is there.

    Args:
        embeddings: SAM's :class:`~sam_backend.embeddings.tiers.EmbeddingTiers`
            with a store (None: SAM's are not computed).
        media: the images fetched for the worker's tasks.
        concepts: SAM 3's tiers with a store (None: SAM 3's are not computed).

    Example:
        >>> worker = PrecomputeWorker.load(PrefetchedMedia(), "demo", cache_dir="/shared/embeddings")  # doctest: +SKIP
        >>> worker(Item(7, "/data/upload/3/a.png", task))  # doctest: +SKIP
        {'outcome': 'encoded', 'error': '', 'models': {'SAM': 'encoded'}}
    """

    def __init__(self, embeddings: EmbeddingTiers | None, media, concepts: EmbeddingTiers | None = None):
        self.embeddings, self.media, self.concepts = embeddings, media, concepts
        self.models = [(name, tiers) for name, tiers in (("SAM", embeddings), ("SAM 3", concepts)) if tiers is not None]

    @classmethod
    def load(cls, media: PrefetchedMedia, preset: str | None, device: str | None = None, cache_dir: str | None = None,
             log_level: str = "WARNING", concept_preset: str | None = None) -> "PrecomputeWorker":
        """A worker with its own models and store (a Ray actor), opened as ``sam-backend precompute`` opens them.

        Raises:
            WorkerFailed: a model or the store cannot be used.
        """
        from sam_backend.embeddings.settings import open_store

        configure_logging(log_level)
        try:
            store = open_store(cache_dir=cache_dir, required=True)
            embeddings, concepts = open_precompute_tiers(store, preset, concept_preset, device)
        except Exception as exc:
            raise WorkerFailed(str(exc) if isinstance(exc, SamBackendError) else f"{type(exc).__name__}: {exc}") from exc
        return cls(embeddings, media, concepts=concepts)

    def start_batch(self, items: list[Item]) -> None:
        """Images are encoded one by one (the store is written per image)."""

    def __call__(self, item: Item) -> dict:
        """``outcome`` (``encoded`` by a model, ``stored`` for all, or ``failed``), ``error``, and per model ``models``.

        Raises:
            StoreError: the store cannot be written: every later image would fail too.
        """
        models: dict[str, str] = {}
        try:
            path = self.media.fetch(item.url, task_id=item.id)
            identity = image_identity(item.url, path)
            for name, tiers in self.models:
                encoded = store_image(tiers, identity, path, item.url, item.id)
                models[name] = "encoded" if encoded else "stored"
        except StoreError:
            raise
        except Exception as exc:  # this task's fault, or a bug: reported, and the run goes on
            return {"outcome": "failed", "error": failure_reason(item.id, exc), "models": models}
        return {"outcome": "encoded" if "encoded" in models.values() else "stored", "error": "", "models": models}


class Precomputer(ProjectRunner):
    """Encode the images of a project's tasks into an embedding store (a :class:`PrecomputeJob`, walked).

    Images are fetched (and hashed) by a few threads ahead of the encoder, so
    downloads overlap encoding.

    Args:
        embeddings: :class:`~sam_backend.embeddings.tiers.EmbeddingTiers` with
            a store (None when ``executor`` runs the encoder elsewhere).
        project: the Label Studio project.
        credentials: for task media (Label Studio's URL and token).
        view: only the tasks of this data manager view.
        data_key: the task data field with the image URL (default: from the label config).
        fetcher: a :class:`MediaFetcher` (default: the server's media cache).
        fetch_threads: parallel downloads.
        progress: show a progress bar.
        executor: where the encoder runs: in this process (default), or a
            :class:`~sam_backend.commands.ray_executor.RayExecutor`.
        preset, device, cache_dir: how Ray actors open their model and store.
        concepts: SAM 3's tiers with a store, to store its vision features too (in this process).
        concept_preset: the SAM 3 preset Ray actors load.

    Example:
        >>> tiers = EmbeddingTiers(load_engine("sam_base_sa1b"), store=open_store(required=True))  # doctest: +SKIP
        >>> project = LabelStudioProject("http://localhost:8080", "<token>", 3)  # doctest: +SKIP
        >>> Precomputer(tiers, project, Credentials("http://localhost:8080", "<token>")).run().lines()  # doctest: +SKIP
        ['120 task(s) in 2400s: 118 encoded, 2 already stored, 0 without an image, 0 failed']
    """

    def __init__(self, embeddings: EmbeddingTiers | None, project: LabelStudioProject, credentials: Credentials,
                 view: int | None = None, data_key: str | None = None, fetcher: MediaFetcher | None = None,
                 fetch_threads: int = 4, progress: bool = True, executor=None, preset: str | None = None,
                 device: str | None = None, cache_dir: str | None = None, concepts: EmbeddingTiers | None = None,
                 concept_preset: str | None = None):
        job = PrecomputeJob(credentials, embeddings, data_key=data_key, preset=preset, device=device,
                            cache_dir=cache_dir, log_level=getattr(executor, "log_level", "WARNING"),
                            concepts=concepts, concept_preset=concept_preset)
        executor = executor if executor is not None else InProcessExecutor(1, fetch_threads, fetcher)
        super().__init__(job, project, executor, view=view, progress=progress)


def store_image(embeddings: EmbeddingTiers, identity: str, path: str, url: str, task_id) -> bool:
    """Encode a task's fetched image into the store unless it is there; True if encoded now.

    Raises:
        StoreError: the store cannot be written (every later image would fail too).
        SamBackendError, OSError: this image cannot be read or encoded.
    """
    return embeddings.ensure_stored(identity, lambda: load_image(path, name=f"The image of task {task_id} ({url})"))


def open_precompute_tiers(store, preset: str | None, concept_preset: str | None, device: str | None = None):
    """``(SAM's tiers or None, SAM 3's tiers or None)`` over ``store``, each model loaded as a served worker
    loads it, so that store keys agree.

    Raises:
        SamBackendError: a preset cannot be loaded, or neither is given.
    """
    from sam_backend.embeddings.tiers import EmbeddingTiers
    from sam_backend.server.loading import load_engine

    if not preset and not concept_preset:
        raise SamBackendError("Nothing to precompute: give a SAM preset, a concept preset, or both.")
    embeddings = concepts = None
    if preset:
        embeddings = EmbeddingTiers(load_engine(preset, device=device), store=store)  # the served precision
    if concept_preset:
        from sam_backend.sam3.engine import ConceptEngine

        concepts = EmbeddingTiers(ConceptEngine.from_preset(concept_preset, device=device), store=store)
    return embeddings, concepts
