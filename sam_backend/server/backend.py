"""The SAM backend: Label Studio tasks and contexts in, predictions out.

It sits between the protocol layer (which knows HTTP, not tensors) and the
engine (which knows tensors, not Label Studio). The model loads in a
background thread so that the server answers health checks at once.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sam_backend.env import env_number
from sam_backend.embeddings.encode_queue import EncodeSkipped, Priority
from sam_backend.embeddings.fingerprints import image_identity
from sam_backend.errors import (
    BadRequestError, ImageError, LabelConfigError, ModelNotReadyError, NotConfiguredError, SamBackendError,
)
from sam_backend.labelstudio.api import LabelStudioError, LabelStudioProject
from sam_backend.labelstudio.concepts import concept_request_from_context, is_concept_context, label_phrases
from sam_backend.labelstudio.labelconfig import LabelConfig, parse_label_config
from sam_backend.labelstudio.media import Credentials, MediaFetcher
from sam_backend.labelstudio.output import OutputSettings, mask_to_regions
from sam_backend.labelstudio.regions import fit_mask, prompt_from_context, prompts_from_task
from sam_backend.sam.images import load_image
from sam_backend.learning.serving import ProjectDecoders
from sam_backend.learning.versions import VersionStore, default_versions_dir
from sam_backend.sam.presets import default_preset, preset_model_version
from sam_backend.server.concepts import ConceptRegions, concept_settings, instances_to_regions
from sam_backend.server.jobs import Outcome, PredictionJobs
from sam_backend.server.lookahead import LookAhead
from sam_backend.server.prelabel import PrelabelSettings, predict_task_masks
from sam_backend.server.refinement import RefinementMemory, prompt_signature
from sam_backend.server.shared_state import MemorySharedState, SharedRecords, SharedState

if TYPE_CHECKING:
    from sam_backend.embeddings.store import EmbeddingStore
    from sam_backend.embeddings.tiers import EmbeddingTiers

logger = logging.getLogger(__name__)

#: Seconds a /predict without context may take (Label Studio waits 100 s);
#: ``SAM_PREDICT_BUDGET`` overrides it.
DEFAULT_PREDICT_BUDGET = 60.0
#: Seconds a /predict that arrives while the model loads waits for it before answering 503
#: (``SAM_LOAD_WAIT``): the first click after a restart is answered, well within Label Studio's 100 s.
DEFAULT_LOAD_WAIT = 30.0


class ModelHolder:
    """Loads a :class:`~sam_backend.sam.engine.SamEngine` and its embedding tiers once, in the background.

    ``state`` is ``"loading"``, ``"ready"`` or ``"failed"``; :meth:`engine`
    and :meth:`embeddings` raise :class:`ModelNotReadyError` until the model
    is ready, with the load error once it failed (no crash loop: the worker
    stays up to say why).

    Args:
        preset: what to load.
        loader: ``preset -> engine``; defaults to :func:`~sam_backend.server.loading.load_engine`.
        store: the embedding store behind the memory cache. Default: with the
            default loader, the store the environment configures
            (:func:`sam_backend.embeddings.settings.open_store`); with a
            ``loader``, none (memory only) unless ``default_store``.
        default_store: open the environment's store even with a ``loader``.

    Example:
        >>> holder = ModelHolder("sam_base_sa1b").start()  # doctest: +SKIP
        >>> holder.wait(); holder.state  # doctest: +SKIP
        'ready'
    """

    def __init__(self, preset: str, loader=None, store: EmbeddingStore | None = None, default_store: bool = False):
        self.preset = preset
        self._loader = loader
        self._store = store
        self._default_store = default_store
        self._embeddings: EmbeddingTiers | None = None
        self.state = "loading"
        self.error: str | None = None
        self.load_seconds: float | None = None
        self._engine = None
        self._ready = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> "ModelHolder":
        """Start loading in a daemon thread (once)."""
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._load, name="sam-model-loader", daemon=True).start()
        return self

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            store = self._store
            if self._loader is None:
                from sam_backend.embeddings.settings import open_store
                from sam_backend.server.loading import load_engine

                engine = load_engine(self.preset, warm_up=False)  # _warm_up below, with the imports a click needs
                store = store if store is not None else open_store()
            else:
                engine = self._loader(self.preset)
                if store is None and self._default_store:
                    from sam_backend.embeddings.settings import open_store

                    store = open_store()
            from sam_backend.embeddings.tiers import EmbeddingTiers

            embeddings = EmbeddingTiers(engine, store=store) if engine is not None else None
        except Exception as exc:  # reported through /health and /predict
            self.error = str(exc) if isinstance(exc, SamBackendError) else f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            logger.error("Model %s failed to load: %s", self.preset, self.error)
        else:
            _warm_up(engine)
            if self._loader is None:  # a served or command's model, kept until the process ends
                _freeze_loaded_objects()
            self._engine, self._embeddings = engine, embeddings
            self.load_seconds = time.perf_counter() - started
            self.state = "ready"
        finally:
            self._ready.set()

    @property
    def loaded_engine(self):
        """The engine once ready, else None (never raises)."""
        return self._engine if self.state == "ready" else None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading ends (ready or failed); False on timeout."""
        return self._ready.wait(timeout)

    def engine(self):
        """The loaded engine.

        Raises:
            ModelNotReadyError: still loading, or failed to load.
        """
        self._check_ready()
        return self._engine

    def embeddings(self) -> EmbeddingTiers:
        """The loaded engine's embedding tiers (memory, store, encoder).

        Raises:
            ModelNotReadyError: still loading, or failed to load.
        """
        self._check_ready()
        return self._embeddings

    @property
    def loaded_embeddings(self) -> EmbeddingTiers | None:
        """The embedding tiers once ready, else None (never raises)."""
        return self._embeddings if self.state == "ready" else None

    def _check_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "failed":
            raise ModelNotReadyError(f"The model {self.preset!r} failed to load: {self.error}")
        raise ModelNotReadyError(f"The model {self.preset!r} is still loading; try again in a few seconds.")


@dataclass
class ProjectSetup:
    """What Label Studio sent to ``/setup`` for one project."""

    hostname: str | None = None
    access_token: str | None = None
    extra_params: dict = field(default_factory=dict)
    label_config: str | None = None


class SamBackend:
    """Answers Label Studio's ``/setup`` and ``/predict`` with SAM masks.

    Args:
        preset: the keras-hub preset (default ``SAM_PRESET`` or ``sam_base_sa1b``).
        holder: a :class:`ModelHolder` (made from ``preset`` if omitted).
        fetcher: a :class:`MediaFetcher`.
        credentials: Label Studio URL and token; default from the environment.
        shared: where what ``/setup`` said and the refinement logits live, so
            that every worker sees them (:func:`~sam_backend.server.shared_state.open_shared_state`,
            as the app factory's server does); default this process's memory.
        decoders: which decoder answers each project
            (:class:`~sam_backend.learning.serving.ProjectDecoders`); default
            the projects' trained versions under ``SAM_VERSIONS_DIR``.
        concept_preset: the SAM 3 preset of concept prompts (default ``SAM_CONCEPT_PRESET``;
            none: concept prompts are refused, and nothing of SAM 3 loads).
        concepts: a :class:`ModelHolder` of a :class:`~sam_backend.sam3.ConceptEngine`
            (made from ``concept_preset`` if omitted).

    Example:
        >>> backend = SamBackend(preset="sam_base_sa1b")  # doctest: +SKIP
        >>> backend.holder.start().wait()  # doctest: +SKIP
        >>> backend.predict(tasks, label_config, context)  # doctest: +SKIP
    """

    def __init__(
        self,
        preset: str | None = None,
        holder: ModelHolder | None = None,
        fetcher: MediaFetcher | None = None,
        credentials: Credentials | None = None,
        shared: SharedState | None = None,
        decoders: ProjectDecoders | None = None,
        concept_preset: str | None = None,
        concepts: ModelHolder | None = None,
    ):
        self.preset = preset or (holder.preset if holder else default_preset())
        self.concept_preset = concept_preset or (concepts.preset if concepts else None) or \
            os.environ.get("SAM_CONCEPT_PRESET") or None
        self.concepts = concepts or (ModelHolder(self.concept_preset, loader=_load_concept_engine, default_store=True)
                                     if self.concept_preset else None)
        self.holder = holder or ModelHolder(self.preset)
        self.fetcher = fetcher or MediaFetcher()
        self.credentials = credentials if credentials is not None else Credentials.from_env()
        self.shared = shared if shared is not None else MemorySharedState()
        # Read from the shared state at each use, never cached: a /setup may reach another worker.
        self.projects: SharedRecords[ProjectSetup] = SharedRecords(self.shared.map("projects"), ProjectSetup)
        self.refinements = RefinementMemory.from_env(self.shared)
        self.load_wait = max(0.0, env_number("SAM_LOAD_WAIT", DEFAULT_LOAD_WAIT))
        # Requests waiting for the model hold gunicorn threads: half of them at most, so /health is answered
        # (with one thread, none waits).
        self._load_waiters = threading.BoundedSemaphore(max(0, _env_int("THREADS", 8) // 2))
        self.jobs = PredictionJobs()
        self._clients: dict[tuple, LabelStudioProject] = {}  # posting late predictions (the jobs' thread only)
        budget = os.environ.get("SAM_PREDICT_BUDGET")
        self.predict_budget = float(budget) if budget else DEFAULT_PREDICT_BUDGET
        self._warmup = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam-warmup")
        self.lookahead = LookAhead(self)
        # Each project's current trained decoder (SAM_VERSIONS_DIR), looked at before its predictions.
        self.decoders = decoders if decoders is not None else ProjectDecoders(
            VersionStore(default_versions_dir(), self.preset, self.model_version))

    @property
    def model_version(self) -> str:
        """The preset's name and the backend's version, e.g. ``sam_base_sa1b@sam-backend-0.1.0``."""
        return preset_model_version(self.preset)

    @property
    def concept_model_version(self) -> str | None:
        """The ``model_version`` of concept (SAM 3) predictions, e.g. ``sam3_pcs@sam-backend-0.5.0``."""
        return preset_model_version(self.concept_preset) if self.concept_preset else None

    def version_for(self, project) -> str:
        """The ``model_version`` of ``project``'s predictions: its current trained version, else :attr:`model_version`."""
        return self.decoders.version_for(project) or self.model_version

    def engine_for(self, project) -> tuple:
        """``(engine, model_version)`` for ``project``: the loaded model with the project's current decoder."""
        engine, version = self.decoders.engine_for(self._engine(), project)
        return engine, version or self.model_version

    # ------------------------------------------------------------------ setup

    def setup(self, body: dict) -> dict:
        """Remember what Label Studio says about a project; never loads the model."""
        project = _project_id(body.get("project"))
        extra = body.get("extra_params")
        if isinstance(extra, str):
            import json

            try:
                extra = json.loads(extra) if extra.strip() else {}
            except ValueError:
                raise BadRequestError("extra_params must be a JSON object.") from None
        self.projects[project] = ProjectSetup(
            hostname=body.get("hostname") or None,
            access_token=body.get("access_token") or None,
            extra_params=extra if isinstance(extra, dict) else {},
            label_config=body.get("schema") or None,
        )
        answer = {"model_version": self.version_for(project)}
        if body.get("schema"):
            # Not an error: Label Studio connects models before the config is final.
            # An output its config cannot take is reported now too; /predict refuses it.
            try:
                self.output_settings(project).kinds(parse_label_config(body["schema"]))
            except (LabelConfigError, BadRequestError) as exc:
                logger.warning("Project %s: %s", project, exc)
                answer["warning"] = str(exc)
        return answer

    def credentials_for(self, project) -> Credentials:
        """Environment credentials, else those ``/setup`` remembered for ``project``."""
        setup = self.projects.get(_project_id(project)) or ProjectSetup()
        return Credentials(
            hostname=self.credentials.hostname or setup.hostname,
            token=self.credentials.token or setup.access_token,
        )

    # ---------------------------------------------------------------- predict

    def predict(self, tasks: list, label_config: str | None, context: dict | None, project=None) -> list[dict]:
        """One prediction per task, in order.

        With a context (an annotator's smart regions) each task gets the mask
        for those prompts. Without one, the pre-labeling mode decides
        (:mod:`sam_backend.server.prelabel`): masks from the task's own boxes, or
        automatic ones, computed within ``predict_budget`` seconds, the rest
        posted to Label Studio later. With nothing to compute, each task gets
        an empty result, and a single task (one being opened) has its image
        encoded in the background so that the first click is fast.

        Raises:
            BadRequestError, LabelConfigError, ImageError, MediaFetchError,
            PromptError, ModelNotReadyError: with a message for the annotator.
        """
        if not isinstance(tasks, list) or not tasks:
            raise BadRequestError('The request needs a non-empty "tasks" list.')
        if not label_config:
            setup = self.projects.get(_project_id(project))
            label_config = setup.label_config if setup else None
        config = parse_label_config(label_config or "")
        if context is not None and not isinstance(context, dict):
            raise BadRequestError('params.context must be an object with a "result" list of regions.')
        if not context or not context.get("result"):
            return self._predict_without_context(tasks, config, project)
        if is_concept_context(context, config):
            answers = [self._predict_concepts(task, config, context, project) for task in tasks]
            if len(tasks) == 1:
                self._saw(tasks[0], config, project)
            return answers
        engine, version = self.engine_for(_request_project(project, tasks))
        answers = [self._predict_task(engine, version, task, config, context, project) for task in tasks]
        if len(tasks) == 1:
            self._saw(tasks[0], config, project)
        return answers

    def _saw(self, task: dict, config: LabelConfig, project) -> None:
        """An annotator is on ``task``, whose image is encoded by now: encode the next tasks meanwhile.

        Called after the task's own encode (a click's, or an opened task's
        warm-up), so that a look-ahead never takes the encoder first.
        """
        task_id = task.get("id") if isinstance(task, dict) else None
        if isinstance(task_id, int) and self.holder.state == "ready":
            self.lookahead.saw(_project_id(project or task.get("project")), task_id, config)

    def _engine(self):
        """The engine; a request that arrives while the model loads waits up to ``load_wait`` seconds for it.

        Raises:
            ModelNotReadyError: still loading after the wait (or too many
                requests waiting already), or failed to load.
        """
        self._wait_for(self.holder)
        return self.holder.engine()

    def _wait_for(self, holder: ModelHolder) -> None:
        if holder.state == "loading" and self.load_wait > 0 and self._load_waiters.acquire(blocking=False):
            try:
                holder.wait(self.load_wait)
            finally:
                self._load_waiters.release()

    def concept_tiers(self) -> EmbeddingTiers:
        """SAM 3's embedding tiers (``.engine`` is the :class:`~sam_backend.sam3.ConceptEngine`).

        Raises:
            NotConfiguredError: the server has no concept preset.
            ModelNotReadyError: it is still loading, or failed to.
        """
        if self.concepts is None:
            raise NotConfiguredError(
                "Concept prompts (a typed phrase, an exemplar box) need SAM 3, which this server was not started "
                "with: start it with --concept-preset sam3_pcs (or SAM_CONCEPT_PRESET); "
                "`sam-backend tiny-preset sam3 DIR` writes a small one to try.")
        self.concepts.start()
        self._wait_for(self.concepts)
        return self.concepts.embeddings()

    def concept_settings(self, project):
        """SAM 3's post-processing settings: the environment's, then the project's ``extra_params``."""
        setup = self.projects.get(_project_id(project))
        return concept_settings(os.environ, setup.extra_params if setup else None)

    def _predict_concepts(self, task: dict, config: LabelConfig, context: dict, project) -> dict:
        """Every instance of the typed phrase (or like the exemplar box) on the task's image, as regions of one label."""
        tiers = self.concept_tiers()
        url, task_id = _image_url(task, config)
        project = project or task.get("project")
        output = self.output_settings(project)
        output.kinds(config)
        settings = self.concept_settings(project)
        key, loader = self.image_source(url, task_id, project)
        embedding = tiers.embedding_for(key, loader)
        request = concept_request_from_context(context, config, embedding.frame.original_size)
        found = tiers.engine.find(embedding, phrase=request.phrase, boxes=request.boxes or None,
                                  box_labels=request.box_labels or None, settings=settings)
        regions = instances_to_regions(found, request.label, config, output,
                                       (request.original_width, request.original_height), request.image_rotation)
        asked = repr(request.phrase) if request.phrase is not None else "the exemplar"
        exemplars = sum(request.box_labels)
        boxes = (f" + {exemplars} exemplar(s)" if exemplars and request.phrase else "") + \
            (f" - {len(request.boxes) - exemplars} counter-example(s)" if len(request.boxes) > exemplars else "")
        logger.info("Task %s: concept %s%s -> %d instance(s) of %s (presence %.2f) in %.2fs", task_id, asked, boxes,
                    regions.instances, request.label, found.presence, found.seconds)
        answer = self._prediction(regions.regions, regions.score, self.concept_model_version)
        if not regions.instances:
            answer["message"] = (f"Nothing like {asked} found: no instance scored above {settings.threshold} "
                                 f"(presence {found.presence:.2f}). Try another phrase, or a lower concept_threshold.")
        return answer

    def _predict_task(self, engine, version: str, task: dict, config: LabelConfig, context: dict, project) -> dict:
        url, task_id = _image_url(task, config)
        output = self.output_settings(project or task.get("project"))
        output.kinds(config)  # a project asking for an output its config lacks fails before any compute
        image_key, embedding = self._keyed_embedding(url, task_id, project or task.get("project"))
        self.lookahead.clicked(image_key)
        prompt = prompt_from_context(context, config, embedding.frame.original_size)
        if not prompt:
            logger.info("Task %s: the context has no smart keypoint or rectangle for %r", task_id, config.image_name)
            return self._prediction([], None, version)
        # A click that extends the previous prompt starts from its mask, as SAM was trained.
        signature = prompt_signature(prompt.points, prompt.labels, prompt.box)
        mask_input = self.refinements.previous(image_key, signature)
        prediction = engine.decode(
            embedding, points=prompt.points or None, labels=prompt.labels or None, box=prompt.box,
            mask_input=mask_input,
        )
        self.refinements.remember(image_key, signature, prediction.low_res_logits[0])
        mask = fit_mask(prediction.mask, prompt.original_width, prompt.original_height)
        labels = output.labels_for(prompt.label, config)
        regions = mask_to_regions(mask, labels, prediction.score, config, output.polygon, prompt.image_rotation)
        logger.info(
            "Task %s: %d point(s), box=%s%s -> %s mask, %.1f%% of the image, IoU %.3f -> %d region(s) (%s)",
            task_id, len(prompt.points), prompt.box is not None, ", refined" if mask_input is not None else "",
            next(iter(labels.values())), 100 * mask.mean(), prediction.score, len(regions), "+".join(labels),
        )
        return self._prediction(regions, prediction.score, version)

    def _embedding(self, url: str, task_id, project, priority: Priority = Priority.CLICK):
        """Fetch the task's image and encode it (``priority`` among queued encodes), unless its embedding is cached."""
        key, loader = self.image_source(url, task_id, project)
        return self.holder.embeddings().embedding_for(key, loader, priority=priority)

    def _keyed_embedding(self, url: str, task_id, project):
        """``(image key, embedding)`` of the task's image (fetched; encoded unless cached or stored)."""
        key, loader = self.image_source(url, task_id, project)
        return key, self.holder.embeddings().embedding_for(key, loader)

    def image_source(self, url: str, task_id, project):
        """``(image key, loader)``: the task's image fetched, identified, and loaded only if needed."""
        path = self.fetcher.fetch(url, task_id=task_id, credentials=self.credentials_for(project))
        return _image_key(url, path, task_id), _image_loader(path, url, task_id)

    @staticmethod
    def _prediction(result: list, score: float | None, version: str) -> dict:
        prediction = {"result": result, "model_version": version}
        if score is not None:
            prediction["score"] = score
        return prediction

    # ------------------------------------------------------------ pre-labeling

    def output_settings(self, project) -> OutputSettings:
        """What a click's mask becomes (brush, polygons): the environment, then the project's ``extra_params``."""
        setup = self.projects.get(_project_id(project))
        return OutputSettings.from_sources(os.environ, setup.extra_params if setup else None)

    def prelabel_settings(self, project) -> PrelabelSettings:
        """The environment's pre-labeling settings, overridden by the project's ``extra_params``."""
        setup = self.projects.get(_project_id(project))
        return PrelabelSettings.from_sources(os.environ, setup.extra_params if setup else None)

    def _predict_without_context(self, tasks: list, config: LabelConfig, project) -> list:
        """Masks from each task's own boxes or automatic ones, answered within the budget.

        Tasks not finished in time answer ``[]`` (no prediction, which Label
        Studio accepts per task) and are posted to Label Studio when ready.
        """
        settings = self.prelabel_settings(project)
        single = len(tasks) == 1
        own = [settings.mode == "boxes" and isinstance(t, dict) and _has_own_prompts(t, config) for t in tasks]
        if settings.mode == "off" or (settings.mode == "boxes" and not any(own)):
            # Nothing to compute: an opened task still gets its image encoded
            # for the first click. A batch would queue CPU work behind clicks.
            if single:
                self._start_warmup(tasks[0], config, project)  # and then the look-ahead
            version = self.version_for(_request_project(project, tasks))
            return [self._prediction([], None, version) for _ in tasks]
        settings.output.kinds(config)  # an output the config cannot take is one error, not one per task
        run, version = self._prelabeller(settings, config, _request_project(project, tasks))
        items, outcomes = [], []
        for task, has_prompts in zip(tasks, own):
            try:
                url, task_id = _image_url(task, config)
            except BadRequestError as exc:
                outcomes.append(Outcome(error=exc))
                continue
            if settings.mode == "boxes" and not has_prompts:
                outcomes.append(Outcome(prediction=self._prediction([], None, version)))
                continue
            task_project = _project_id(task.get("project") or project)
            compute = functools.partial(run, version, task, url, config, settings, project)
            deliver = functools.partial(self._post_prediction, task_id, task_project)
            items.append(((task_project, task_id, version, settings), compute, deliver))
            outcomes.append(None)
        started = time.monotonic()
        computed = iter(self.jobs.run(items, self.predict_budget))
        outcomes = [o if o is not None else next(computed) for o in outcomes]
        answers = []
        for task, outcome in zip(tasks, outcomes):
            if outcome.error is not None:
                if single:
                    raise outcome.error
                task_id = task.get("id") if isinstance(task, dict) else None
                logger.warning("Task %s: no prediction: %s", task_id, outcome.error)
            answers.append(outcome.prediction if outcome.prediction is not None else [])
        if single:
            self._saw(tasks[0], config, project)
        pending = sum(o.pending for o in outcomes)
        if pending:
            logger.info(
                "/predict: %d of %d task(s) done in %.1fs (budget %.0fs); %d continue in the background "
                "and are posted to Label Studio when ready",
                len(tasks) - pending, len(tasks), time.monotonic() - started, self.predict_budget, pending,
            )
        return answers

    def prelabel(self, task: dict, config: LabelConfig, settings: PrelabelSettings, project=None) -> dict:
        """The prediction for one task without a click, computed now (``sam-backend preannotate``).

        Raises:
            SamBackendError: the task's image cannot be fetched or read, a region is malformed...
        """
        url, _ = _image_url(task, config)
        if settings.mode == "concepts":
            run, version = self._prelabeller(settings, config, project)
            return run(version, task, url, config, settings, project)
        engine, version = self.decoders.engine_for(self.holder.engine(), _request_project(project, [task]))
        return self._prelabel_task(engine, version or self.model_version, task, url, config, settings, project)

    def _prelabeller(self, settings: PrelabelSettings, config: LabelConfig, project) -> tuple:
        """``(compute, model_version)``: what computes a task's prediction in this mode (its checks done once)."""
        if settings.mode == "concepts":
            phrases = label_phrases(config, dict(settings.concepts))
            return functools.partial(self._concept_prelabel_task, self.concept_tiers(), phrases), \
                self.concept_model_version
        engine, version = self.engine_for(project)
        return functools.partial(self._prelabel_task, engine), version

    def encode_tasks(self, tasks: list[dict], config: LabelConfig, project=None, concepts: bool = False) -> None:
        """Fetch the tasks' images and encode those not cached in one encoder call (GPU batches); SAM 3's if ``concepts``."""
        items = [self.image_source(*_image_url(task, config), project or task.get("project")) for task in tasks]
        tiers = self.concept_tiers() if concepts else self.holder.embeddings()
        tiers.embeddings_for_many(items)

    def _concept_prelabel_task(self, tiers, phrases: dict[str, str], version: str, task: dict, url: str,
                               config: LabelConfig, settings: PrelabelSettings, project) -> dict:
        # One vision encode per image (or none: the store), then one decode per label.
        key, loader = self.image_source(url, task.get("id"), project or task.get("project"))
        embedding = tiers.embedding_for(key, loader, priority=Priority.BACKGROUND)
        regions = ConceptRegions()
        for label, phrase in phrases.items():
            found = tiers.engine.find(embedding, phrase=phrase, settings=settings.concept)
            instances_to_regions(found, label, config, settings.output, regions=regions)
        logger.info("Task %s: %d instance(s) of %d concept(s)", task.get("id"), regions.instances, len(phrases))
        return self._prediction(regions.regions, regions.score, version)

    def _prelabel_task(self, engine, version: str, task: dict, url: str, config: LabelConfig, settings: PrelabelSettings,
                       project) -> dict:
        # Behind clicks and warm-ups in the encode queue: nobody is waiting at a click for it.
        embedding = self._embedding(url, task.get("id"), project or task.get("project"), Priority.BACKGROUND)
        found = predict_task_masks(engine, embedding, task, config, settings)
        logger.info("Task %s: %d mask(s) from %s", task.get("id"), len(found.regions), found.source)
        return self._prediction(found.regions, found.score, version)

    def _post_prediction(self, task_id, project: str, prediction: dict) -> None:
        """Post a prediction finished after the request's budget to Label Studio."""
        credentials = self.credentials_for(project)
        if not (credentials.hostname and credentials.token and project):
            raise LabelStudioError(
                f"no Label Studio URL and token to post task {task_id}'s prediction: set LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY, or retrieve predictions again, or run sam-backend preannotate"
            )
        key = (credentials.hostname, credentials.token, int(project))
        if key not in self._clients:
            # One client per project: a personal access token is exchanged once, not per prediction.
            self._clients[key] = LabelStudioProject(*key)
        self._clients[key].create_predictions([{"task": task_id, **prediction}])
        logger.info("Task %s: prediction posted to Label Studio after the request's budget", task_id)

    def _start_warmup(self, task, config: LabelConfig, project) -> None:
        """Encode the task's image in the background (best effort) so the first click is fast.

        Warm-ups wait behind clicks in the encode queue, and are dropped once
        older than ``SAM_WARMUP_MAX_AGE`` (their annotator has clicked, which
        encodes the image, or moved on), here before the fetch or in the queue.
        """
        if self.holder.state != "ready" or not isinstance(task, dict):
            return
        try:
            url, task_id = _image_url(task, config)
        except BadRequestError:
            return

        asked = time.monotonic()

        def warm():
            try:
                waited = time.monotonic() - asked
                if waited > self.holder.embeddings().queue.max_warmup_age:
                    raise EncodeSkipped(f"it waited {waited:.0f}s behind other warm-ups")
                self._embedding(url, task_id, project or task.get("project"), Priority.WARMUP)
            except SamBackendError as exc:
                logger.info("Warm-up of task %s skipped: %s", task_id, exc)
            except Exception:
                logger.exception("Warm-up of task %s failed", task_id)
            self._saw(task, config, project)

        self._warmup.submit(warm)


def _has_own_prompts(task: dict, config: LabelConfig) -> bool:
    """Whether the task has boxes or keypoints to start from (sizes do not matter for that)."""
    try:
        return bool(prompts_from_task(task, config, (1, 1)))
    except SamBackendError:
        return True  # computing it reports the error for this task


def _load_concept_engine(preset: str):
    """SAM 3 from ``preset`` (the ``concepts`` extra); imported only when a concept preset is configured."""
    from sam_backend.sam3.engine import ConceptEngine

    return ConceptEngine.from_preset(preset)


def _freeze_loaded_objects() -> None:
    """Take what loading made (the model, torch, keras: some 700,000 objects) out of the cyclic GC's count.

    torch's and keras' tree utilities leave reference cycles at every model
    call, some holding an image's features or an encode's result; only a full
    collection frees those, and CPython runs one when the objects that
    survived grow by a quarter of those already kept. Counting the model's
    objects, that took more than 600 requests, and a worker's memory grew by
    about 0.4 MB per new image until then (``bench/load.py``). Frozen, they are
    neither counted nor traversed: a full collection comes every few dozen
    requests and costs milliseconds.
    """
    gc.collect()  # the load's own garbage is freed, not frozen
    gc.freeze()
    gc.collect()  # and the count starts again from what is not frozen


def _warm_up(engine) -> None:
    """Pay the model's one-time costs at load, while ``/health`` still says ``loading``, not at the first click.

    The imports a click needs, then :meth:`SamEngine.warm_up
    <sam_backend.sam.engine.SamEngine.warm_up>`: the image encoder's first
    call (seconds on a CPU), a decode of each prompt kind, and the check of
    the torch click decoder against keras-hub's layers. None of it counts as
    an encode or a click in the metrics.
    """
    started = time.perf_counter()
    try:
        import label_studio_sdk.converter.brush  # noqa: F401  (the RLE of every mask)
        import label_studio_sdk.label_interface  # noqa: F401  (label config parsing)
        import cv2  # noqa: F401  (polygon outlines: 0.3 s to import)

        warm_up = getattr(engine, "warm_up", None)
        if warm_up is not None:
            warm_up()
    except Exception:  # a failed warm-up costs the first click some time, nothing more
        logger.exception("Warm-up after loading failed")
    logger.info("Warmed up in %.2fs", time.perf_counter() - started)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "").strip() or default)
    except ValueError:
        return default


def _request_project(project, tasks: list):
    """The project a request is about: the body's, else its first task's."""
    if project not in (None, ""):
        return project
    first = tasks[0] if tasks else None
    return first.get("project") if isinstance(first, dict) else None


def _project_id(project) -> str:
    """Label Studio sends ``"<id>.<created_at>"``; the id is what identifies a project."""
    return str(project).split(".")[0] if project is not None else ""


def _image_url(task, config: LabelConfig) -> tuple[str, object]:
    if not isinstance(task, dict):
        raise BadRequestError("Each task must be an object with a data field.")
    task_id = task.get("id")
    data = task.get("data")
    if not isinstance(data, dict) or not data.get(config.image_key):
        raise BadRequestError(
            f'Task {task_id} has no "{config.image_key}" in its data, which the label config\'s '
            f'<Image name="{config.image_name}" value="${config.image_key}"> reads. Import tasks with '
            f'{{"data": {{"{config.image_key}": "<image URL>"}}}}.'
        )
    url = data[config.image_key]
    if not isinstance(url, str):
        raise BadRequestError(f'Task {task_id}: data.{config.image_key} must be a URL string.')
    return url, task_id


def _image_loader(path: str, url: str, task_id):
    """Load the image only if the cache misses; errors name the task and URL, not our temp file."""
    return lambda: load_image(path, name=f"The image of task {task_id} ({url})")


def _image_key(url: str, path: str, task_id=None) -> str:
    """The image's identity: its URL plus a digest of the file, so a replaced file is re-encoded."""
    try:
        return image_identity(url, path)
    except OSError as exc:
        raise ImageError(f"The image of task {task_id} ({url}) cannot be read after fetching it: {exc}.") from None
