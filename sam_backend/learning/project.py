"""One training of a project's decoder, from Label Studio's annotations to a new version (or a rejected one).

1. The project's annotated tasks are read from Label Studio page by page;
   each task's chosen annotation (:func:`chosen_annotation`) gives its brush
   and polygon objects as masks.
2. Each task's image embedding comes from the embedding store, or is encoded
   behind every click and pre-labelling in the encode queue.
3. A fixed share of the tasks (chosen by a hash of the task id, so a task
   stays on its side as the project grows) is held out; the rest trains a
   copy of the decoder in use (:class:`DecoderTuner`).
4. The gate: both decoders are scored on the held-out tasks; the new one is
   made current only if it scores higher. Every version is kept with its
   figures; a rejected one says why.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from sam_backend.embeddings.encode_queue import Priority
from sam_backend.embeddings.fingerprints import image_identity
from sam_backend.embeddings.tiers import EmbeddingTiers
from sam_backend.errors import SamBackendError
from sam_backend.labelstudio.annotations import annotation_masks, chosen_annotation
from sam_backend.labelstudio.api import LabelStudioError, LabelStudioProject
from sam_backend.labelstudio.labelconfig import parse_label_config
from sam_backend.labelstudio.media import Credentials, MediaFetcher
from sam_backend.learning.tuning import AnnotatedImage, DecoderTuner, Interrupted, Scores, TuneSettings, evaluate
from sam_backend.learning.versions import VersionError, VersionInfo, VersionStore
from sam_backend.sam.images import load_image

logger = logging.getLogger(__name__)

#: The held-out share of the annotated tasks, and its floor.
HELD_OUT_SHARE = 0.2
MIN_HELD_OUT = 5
#: Fewer training tasks than this teach nothing worth a version.
MIN_TRAINING = 5


@dataclass
class TrainingOutcome:
    """What one training did.

    Attributes:
        project: the project id.
        status: ``accepted`` (a new current version), ``rejected`` (kept, not
            used), ``skipped`` (nothing to train on, or already training) or ``failed``.
        reason: in words, for the log and ``sam-backend train``.
        cause: the reason in one word, for ``/metrics``: ``better``, ``not_better``,
            ``too_few_annotations``, ``label_studio``, ``write``, ``error``.
        version: the version written (accepted or rejected).
        tasks: annotated tasks used (training + held out).
        objects: annotated objects among them.
        problems: ``{task id: why it was left out}``.
        seconds: the whole training.
    """

    project: int
    status: str
    reason: str
    cause: str = "error"
    version: VersionInfo | None = None
    tasks: int = 0
    objects: int = 0
    problems: dict = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"project": self.project, "status": self.status, "reason": self.reason, "cause": self.cause,
                "version": self.version.name if self.version else None, "tasks": self.tasks,
                "objects": self.objects, "problems": len(self.problems), "seconds": round(self.seconds, 1),
                "finished": time.time()}


def held_out(task_ids: list[int], project: int) -> set[int]:
    """The tasks kept for the gate: at least :data:`HELD_OUT_SHARE` of them, and at least :data:`MIN_HELD_OUT`.

    A task is held out when a hash of ``project:task`` falls in the lowest
    :data:`HELD_OUT_SHARE` of its range: the same task is always on the
    same side however the project grows. Where chance leaves too few, the
    next tasks in hash order are added.

    Example:
        >>> len(held_out(list(range(8)), 3))
        5
    """
    def position(task: int) -> float:
        return int(hashlib.sha256(f"{project}:{task}".encode()).hexdigest()[:12], 16) / 16**12

    count = max(MIN_HELD_OUT, math.ceil(HELD_OUT_SHARE * len(task_ids)))
    ranked = sorted(task_ids, key=position)
    chosen = {t for t in ranked if position(t) < HELD_OUT_SHARE}
    return chosen if len(chosen) >= count else set(ranked[:count])  # ranked starts with the chosen ones


class ProjectTrainer:
    """Train a project's decoder from its Label Studio annotations, gated on held-out tasks.

    Args:
        tiers: the embeddings (and the engine whose image encoder made them).
        project: the Label Studio project.
        versions: where versions are written.
        credentials: for task media.
        fetcher: fetches task images (default: the server's media cache).
        settings: how to train.

    Example:
        >>> trainer = ProjectTrainer(tiers, LabelStudioProject(url, token, 12), versions, Credentials(url, token))  # doctest: +SKIP
        >>> trainer.run().reason  # doctest: +SKIP
        'held-out mean IoU 0.741 -> 0.836 (click 0.702 -> 0.845, box 0.780 -> 0.827) on 8 task(s)'
    """

    def __init__(self, tiers: EmbeddingTiers, project: LabelStudioProject, versions: VersionStore,
                 credentials: Credentials, fetcher: MediaFetcher | None = None, settings: TuneSettings | None = None):
        self.tiers, self.project, self.versions = tiers, project, versions
        self.credentials = credentials
        self.fetcher = fetcher or MediaFetcher()
        self.settings = settings or TuneSettings()

    def run(self, should_stop: Callable[[], bool] | None = None) -> TrainingOutcome:
        """One training, under the project's training lock; never raises for the project's data.

        Raises:
            TrainingBusy: another training of the project is running.
            Interrupted: ``should_stop`` said so (nothing is written).
        """
        project = self.project.project
        started = time.perf_counter()
        with self.versions.training_lock(project):
            if self.versions.discard_partial(project):
                logger.warning("Project %s: removed what an interrupted training had half-written", project)
            try:
                outcome = self._train(should_stop)
            except LabelStudioError as exc:
                outcome = TrainingOutcome(project, "failed", f"Label Studio: {exc}", cause="label_studio")
            except VersionError as exc:
                outcome = TrainingOutcome(project, "failed", str(exc), cause="write")
            except SamBackendError as exc:
                outcome = TrainingOutcome(project, "failed", str(exc))
            outcome.seconds = time.perf_counter() - started
        log = logger.info if outcome.status in ("accepted", "skipped") else logger.warning
        log("Project %s training %s in %.0fs: %s", project, outcome.status, outcome.seconds, outcome.reason)
        self.versions.record_outcome(project, outcome.as_dict())
        return outcome

    def _train(self, should_stop) -> TrainingOutcome:
        project = self.project.project
        images, problems = self.annotated_images(should_stop)
        objects = sum(len(i.masks) for i in images)
        outcome = TrainingOutcome(project, "skipped", "", "too_few_annotations", tasks=len(images), objects=objects,
                                  problems=problems)
        needed = MIN_HELD_OUT + MIN_TRAINING
        if len(images) < needed:
            outcome.reason = (f"{len(images)} annotated task(s) with brush or polygon objects; training needs at "
                              f"least {needed} ({MIN_HELD_OUT} held out to judge a version, {MIN_TRAINING} to learn from)")
            return outcome
        chosen = held_out([i.task_id for i in images], project)
        judge = [i for i in images if i.task_id in chosen]
        learn = [i for i in images if i.task_id not in chosen]
        if len(learn) < MIN_TRAINING:  # chance put more than the share on the held-out side
            outcome.reason = (f"{len(judge)} of {len(images)} annotated task(s) are held out, {len(learn)} left to "
                              f"learn from; training needs {MIN_TRAINING}")
            return outcome
        engine = self.tiers.engine
        current = self.versions.current(project)
        start = engine.with_decoder(self.versions.load_weights(current)) if current else engine
        before = evaluate(start, judge)
        try:
            tuned, report = DecoderTuner(start, self.settings).fit(learn, should_stop)
        except ValueError as exc:  # every training object too small to see at the decoder's resolution
            outcome.reason = f"nothing to learn from: {exc}"
            return outcome
        after = evaluate(tuned, judge)
        accepted = after.mean > before.mean
        reason = _gate_words(before, after, len(judge), current, accepted)
        details = {"training_tasks": len(learn), "held_out_tasks": len(judge), "objects": objects,
                   "steps": report.steps, "train_seconds": round(report.seconds, 1),
                   "started_from": current.name if current else "preset", "left_out_tasks": len(problems)}
        if report.stopped:
            details["stopped_early"] = report.stopped
        outcome.version = self.versions.save(project, tuned.decoder_weights(), accepted, reason, before.as_dict(),
                                             after.as_dict(), details)
        outcome.status, outcome.cause = ("accepted", "better") if accepted else ("rejected", "not_better")
        outcome.reason = f"{outcome.version.name}: {reason}"
        return outcome

    def annotated_images(self, should_stop=None) -> tuple[list[AnnotatedImage], dict]:
        """The annotated tasks as :class:`AnnotatedImage` s, and ``{task id: why it was left out}`` for the others.

        Raises:
            LabelStudioError: Label Studio cannot be read (the training fails; nothing changes).
            LabelConfigError: the project's config has no image.
        """
        config = parse_label_config(self.project.label_config())
        images, problems = [], {}
        for task in self.project.annotated_tasks():
            if should_stop is not None and should_stop():
                raise Interrupted("asked to stop")
            task_id = task.get("id")
            annotation = chosen_annotation(task)
            url = (task.get("data") or {}).get(config.image_key)
            if annotation is None or not isinstance(url, str) or not url:
                problems[task_id] = "no usable annotation" if annotation is None else f"no {config.image_key!r} URL"
                continue
            try:
                embedding = self._embedding(url, task_id)
            except (SamBackendError, OSError) as exc:
                problems[task_id] = f"its image: {exc}"
                logger.warning("Project %s, task %s left out of training: %s", self.project.project, task_id, exc)
                continue
            found = annotation_masks(annotation["result"], embedding.frame.original_size)
            for why in found.unreadable:
                logger.warning("Project %s, task %s: %s (left out of training)", self.project.project, task_id, why)
            if not found.objects:
                problems[task_id] = "; ".join(found.unreadable) or "no brush or polygon object"
                continue
            images.append(AnnotatedImage(int(task_id), embedding, [o.mask for o in found.objects]))
        return images, problems

    def _embedding(self, url: str, task_id):
        path = self.fetcher.fetch(url, task_id=task_id, credentials=self.credentials)
        key = image_identity(url, path)
        loader = lambda: load_image(path, name=f"The image of task {task_id} ({url})")  # noqa: E731
        # Behind every click and pre-labelling: an annotator never waits for training's encodes.
        return self.tiers.embedding_for(key, loader, priority=Priority.LOOKAHEAD)


def _gate_words(before: Scores, after: Scores, held: int, current: VersionInfo | None, accepted: bool) -> str:
    against = current.name if current else "the preset"
    figures = (f"held-out mean IoU {before.mean:.3f} -> {after.mean:.3f} (click {before.click:.3f} -> "
               f"{after.click:.3f}, box {before.box:.3f} -> {after.box:.3f}) on {held} task(s), {after.objects} object(s)")
    if accepted:
        return f"{figures}; replaces {against}"
    return f"{figures}; not better than {against}, which stays in use"

