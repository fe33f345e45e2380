"""``sam-backend precompute``: every task image of a project encoded into the store ahead of time.

Run it overnight (or on a GPU machine, then copy the store directory to the
serving host): afterwards the first click on any task costs what the tenth
does. Images already stored are skipped, so a second run, or a run after an
interruption, only encodes what is missing; entries are written atomically,
so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from typing import TYPE_CHECKING, Iterator

from sam_backend.embeddings.fingerprints import image_identity
from sam_backend.errors import LabelConfigError, SamBackendError, StoreError
from sam_backend.labelstudio.api import LabelStudioError, LabelStudioProject, RunSummary
from sam_backend.labelstudio.labelconfig import parse_label_config
from sam_backend.labelstudio.media import Credentials, MediaFetcher
from sam_backend.sam.images import load_image

if TYPE_CHECKING:
    from sam_backend.embeddings.tiers import EmbeddingTiers

logger = logging.getLogger(__name__)


@dataclass
class PrecomputeSummary(RunSummary):
    """What a run did (and :class:`~sam_backend.labelstudio.api.RunSummary`'s failures and interruption).

    Attributes:
        tasks: tasks seen.
        encoded: images encoded and stored by this run.
        stored: images that were already in the store (skipped).
        no_image: tasks without an image URL in their data.
    """

    tasks: int = 0
    encoded: int = 0
    stored: int = 0
    no_image: int = 0

    def lines(self) -> list[str]:
        """A human summary, one line per fact."""
        lines = [f"{self.tasks} task(s) in {self.seconds:.0f}s: {self.encoded} encoded, "
                 f"{self.stored} already stored, {self.no_image} without an image, {len(self.failed)} failed"]
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


class Precomputer:
    """Encodes the images of a project's tasks into an embedding store.

    Images are fetched (and hashed) by a few threads ahead of the encoder, so
    downloads overlap encoding.

    Args:
        embeddings: :class:`~sam_backend.embeddings.tiers.EmbeddingTiers` with a store.
        project: the Label Studio project.
        credentials: for task media (Label Studio's URL and token).
        view: only the tasks of this data manager view.
        data_key: the task data field with the image URL (default: from the label config).
        fetcher: a :class:`MediaFetcher` (default: the server's media cache).
        fetch_threads: parallel downloads.
        progress: show a progress bar.

    Example:
        >>> tiers = EmbeddingTiers(SamEngine.from_preset("sam_base_sa1b"), store=open_store(required=True))  # doctest: +SKIP
        >>> project = LabelStudioProject("http://localhost:8080", "<token>", 3)  # doctest: +SKIP
        >>> Precomputer(tiers, project, Credentials("http://localhost:8080", "<token>")).run().lines()  # doctest: +SKIP
        ['120 task(s) in 2400s: 118 encoded, 2 already stored, 0 without an image, 0 failed']
    """

    def __init__(self, embeddings: EmbeddingTiers, project: LabelStudioProject, credentials: Credentials, view: int | None = None,
                 data_key: str | None = None, fetcher: MediaFetcher | None = None, fetch_threads: int = 4,
                 progress: bool = True):
        if embeddings.store is None:
            raise StoreError("precompute needs an embedding store; none is configured or it is not writable.")
        self.embeddings, self.project, self.credentials = embeddings, project, credentials
        self.view, self.data_key = view, data_key
        self.fetcher = fetcher or MediaFetcher()
        self.fetch_threads = max(1, fetch_threads)
        self.progress = progress

    def run(self) -> PrecomputeSummary:
        """Walk the project once. Ctrl-C stops it; what is stored stays stored.

        Raises:
            LabelStudioError: the project cannot be read at all (wrong URL, token or id).
            LabelConfigError: no image field can be found.
            StoreError: the store cannot be written (full disk...): every
                later image would fail too.
        """
        from tqdm import tqdm

        started = time.monotonic()
        summary = PrecomputeSummary()
        data_key = self.data_key or image_data_key(self.project.label_config())
        total = self.project.count_tasks(self.view)
        logger.info("Precomputing %d task(s) of project %s (image field %r) into %s",
                    total, self.project.project, data_key, self.embeddings.store.location)
        bar = tqdm(total=total, unit="image", disable=not self.progress, dynamic_ncols=True,
                   desc=f"project {self.project.project}")
        pool = ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="sam-fetch")
        try:
            with stop_resumably(summary):
                self._walk(data_key, summary, bar, pool)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            bar.close()
        summary.seconds = time.monotonic() - started
        return summary

    def _walk(self, data_key: str, summary: PrecomputeSummary, bar, pool: ThreadPoolExecutor) -> None:
        tasks = iter(self.project.iter_tasks(self.view))
        pending: deque[tuple[dict, Future | None]] = deque()

        def submit_next() -> None:
            task = next(tasks, None)
            if task is None:
                return
            url = (task.get("data") or {}).get(data_key)
            future = pool.submit(self._fetch, url, task.get("id")) if isinstance(url, str) and url else None
            pending.append((task, future))

        for _ in range(2 * self.fetch_threads):  # downloads run this far ahead of the encoder
            submit_next()
        while pending:
            task, future = pending.popleft()
            submit_next()
            summary.tasks += 1
            self._encode(task, future, data_key, summary)
            bar.update(1)
            bar.set_postfix(encoded=summary.encoded, stored=summary.stored, failed=len(summary.failed), refresh=False)

    def _fetch(self, url: str, task_id) -> tuple[str, str, str]:
        """``(url, image identity, local path)``: in a fetch thread."""
        path = self.fetcher.fetch(url, task_id=task_id, credentials=self.credentials)
        return url, image_identity(url, path), path

    def _encode(self, task: dict, future: Future | None, data_key: str, summary: PrecomputeSummary) -> None:
        task_id = task.get("id")
        if future is None:
            summary.no_image += 1
            logger.info("Task %s has no %r URL in its data; skipped.", task_id, data_key)
            return
        try:
            url, identity, path = future.result()
            encoded = store_image(self.embeddings, identity, path, url, task_id)
        except StoreError:
            raise
        except Exception as exc:  # this task's fault, or a bug: reported, and the run goes on
            summary.failed[task_id] = failure_reason(task_id, exc)
            return
        if encoded:
            summary.encoded += 1
        else:
            summary.stored += 1


@contextlib.contextmanager
def stop_resumably(summary: PrecomputeSummary) -> Iterator[None]:
    """End a walk over a project's images on Ctrl-C, or when Label Studio goes away after the first task.

    What is stored stays stored and the summary says the run was interrupted,
    so the next run resumes; a Label Studio error before any task is raised
    (nothing was done: the caller reports it). The single-machine and the Ray
    precompute both walk inside it.
    """
    try:
        yield
    except KeyboardInterrupt:
        summary.interrupted = True
        logger.warning("Interrupted after %d task(s); stored images stay stored.", summary.tasks)
    except LabelStudioError as exc:
        if summary.tasks == 0:
            raise
        summary.interrupted = True
        logger.error("%s", exc)


def store_image(embeddings: EmbeddingTiers, identity: str, path: str, url: str, task_id) -> bool:
    """Encode a task's fetched image into the store unless it is there; True if encoded now.

    The single-machine run and the Ray actors (:mod:`.ray_pipeline`) both call
    it, so an image gets the same entry either way.

    Raises:
        StoreError: the store cannot be written (every later image would fail too).
        SamBackendError, OSError: this image cannot be read or encoded.
    """
    return embeddings.ensure_stored(identity, lambda: load_image(path, name=f"The image of task {task_id} ({url})"))


def failure_reason(task_id, exc: Exception) -> str:
    """Why a task's image could not be stored, for the summary (logged here, with a traceback for a bug)."""
    if isinstance(exc, SamBackendError):
        logger.warning("Task %s failed: %s", task_id, exc)
        return str(exc)
    if isinstance(exc, OSError):
        logger.warning("Task %s failed: %s", task_id, exc)
        return f"cannot read the fetched image: {exc}"
    logger.error("Task %s failed", task_id, exc_info=exc)
    return f"{type(exc).__name__}: {exc}"
