"""One skeleton for the whole-project runs (``preannotate``, ``precompute``), whatever runs the model.

A run is a :class:`Job` (what is done to a task: which tasks it takes, the
per-task model work, what happens to each result) walked over a project by
:class:`ProjectRunner`, which owns everything the two runs share: the task
walk (lazy, paged by label-studio-sdk), the selection and the ``--limit``,
Ctrl-C (the first stops after the current task, a second at once), Label
Studio going away, the progress bar and the summary's timing. The per-task
model work runs in an executor:

- :class:`InProcessExecutor`: in this process, images fetched a few tasks
  ahead by threads, tasks in order, in batches (encoded together on a GPU);
- :class:`~sam_backend.commands.ray_executor.RayExecutor`: in a Ray Data actor
  pool, on this machine or a cluster.

Both build the job's worker with a :class:`PrefetchedMedia` that holds the
images fetched for it, so the worker's code is the same either way, and a
task gets the same result, or fails with the same reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

from sam_backend.errors import SamBackendError
from sam_backend.labelstudio.api import LabelStudioError, LabelStudioProject, RunSummary
from sam_backend.labelstudio.media import Credentials, MediaFetcher

logger = logging.getLogger(__name__)


class WorkerFailed(SamBackendError):
    """The model worker cannot go on (its model did not load, its store cannot be written): the run stops."""


class RunFailed(SamBackendError):
    """The executor itself failed (a Ray worker died, the cluster went away): the run stops, resumable."""


@dataclass
class Item:
    """One selected task on its way to a worker.

    Attributes:
        id: the task id.
        url: its image URL ("" when it has none: the worker reports it).
        task: the task as Label Studio listed it.
    """

    id: int
    url: str
    task: dict = field(repr=False)


class TaskWorker(Protocol):
    """The per-task model work of a job, built once per executor (per Ray actor)."""

    def start_batch(self, items: list[Item]) -> None:
        """Before a batch's tasks (a GPU encodes their images together here)."""

    def __call__(self, item: Item) -> dict:
        """The task's result (picklable); raises :class:`WorkerFailed` to stop the run."""


class Job:
    """What a kind of run does with a project's tasks; :class:`ProjectRunner` walks it.

    Subclasses set :attr:`summary` and implement the methods below. The worker
    is described twice: :meth:`local_worker` builds it in this process (around
    a model already loaded here), :meth:`remote_worker` says how a Ray actor
    builds its own (a picklable factory and its keyword arguments).
    """

    #: What the progress bar counts.
    unit = "task"
    summary: RunSummary

    def prepare(self, project: LabelStudioProject) -> None:
        """Read what the run needs before the walk (label config...); raise what makes it impossible."""

    def select(self, task: dict) -> Item | None:
        """The task as an :class:`Item` for the worker, or None when it is not the job's (counted here)."""
        raise NotImplementedError

    def credentials(self) -> Credentials:
        """Label Studio's URL and token for the task media."""
        raise NotImplementedError

    def local_worker(self, media: "PrefetchedMedia") -> TaskWorker:
        raise NotImplementedError

    def remote_worker(self) -> tuple[Callable[..., TaskWorker], dict]:
        """``(factory, kwargs)``: ``factory(media=..., **kwargs)`` builds the worker in a Ray actor."""
        raise NotImplementedError

    def record(self, item: Item, result: dict) -> None:
        """Count a result into :attr:`summary`; queue what is to be uploaded, and upload a full batch."""
        raise NotImplementedError

    def flush(self) -> None:
        """Upload what is queued (at the end of a run, after Ctrl-C too)."""

    def progress(self) -> dict:
        """Figures for the progress bar's postfix."""
        return {"failed": len(self.summary.failed)}


class ProjectRunner:
    """Walk a project's tasks through a :class:`Job` and an executor; return the job's summary.

    Args:
        job: what is done to each task.
        project: the Label Studio project.
        executor: :class:`InProcessExecutor` (default) or a ``RayExecutor``.
        view: a data manager view id, to work on its tasks only.
        limit: give at most this many tasks to the worker.
        progress: show a progress bar.

    Example:
        >>> job = PrelabelJob(backend, project, settings)  # doctest: +SKIP
        >>> ProjectRunner(job, project, InProcessExecutor(batch_size=16)).run().exit_code  # doctest: +SKIP
        0
    """

    def __init__(self, job: Job, project: LabelStudioProject, executor=None, view: int | None = None,
                 limit: int | None = None, progress: bool = True):
        self.job, self.project = job, project
        self.executor = executor if executor is not None else InProcessExecutor()
        self.view, self.limit, self.progress = view, limit, progress
        self.stop = threading.Event()

    def run(self) -> RunSummary:
        """Walk the project once; Ctrl-C (in the main thread) stops after the current task.

        Raises:
            LabelStudioError: the project cannot be read at all (nothing was done).
            SamBackendError: the job cannot start (a label config it cannot use), or the worker failed.
        """
        with self.executor.session():
            if threading.current_thread() is not threading.main_thread():
                return self._run()
            previous = signal.signal(signal.SIGINT, self._on_interrupt)
            try:
                return self._run()
            finally:
                signal.signal(signal.SIGINT, previous)

    def _on_interrupt(self, signum, frame) -> None:
        if self.stop.is_set() or self.executor.waiting:
            raise KeyboardInterrupt  # a second Ctrl-C, or nothing to finish: stop now
        logger.warning("Stopping after the current task (Ctrl-C again to stop at once)...")
        self.stop.set()

    def _run(self) -> RunSummary:
        from tqdm import tqdm

        started = time.monotonic()
        job, summary = self.job, self.job.summary
        job.prepare(self.project)
        total = self.project.count_tasks(self.view)
        where = getattr(self.executor, "label", "")
        bar = tqdm(total=min(total, self.limit) if self.limit else total, unit=job.unit, dynamic_ncols=True,
                   disable=not self.progress, desc=f"project {self.project.project}{where}")
        walked = _Walk(self.project.iter_tasks(self.view))
        try:
            for item, result in self.executor.results(self._selected(walked, bar), job, self.stop.is_set):
                job.record(item, result)
                bar.update(1)
                bar.set_postfix(refresh=False, **job.progress())
                if self.stop.is_set():
                    break
            if self.stop.is_set():
                summary.interrupted, summary.stopped_by = True, "Ctrl-C"
        except KeyboardInterrupt:
            summary.interrupted, summary.stopped_by = True, "Ctrl-C"
        except (LabelStudioError, RunFailed) as exc:
            if isinstance(exc, LabelStudioError) and not walked.started:
                raise  # nothing was done: the caller reports it
            # What is done stays done; the next run resumes after it.
            logger.error("%s", exc)
            summary.interrupted, summary.stopped_by = True, str(exc)
        finally:
            try:
                job.flush()  # after Ctrl-C too: what is done is uploaded
            except LabelStudioError as exc:
                logger.error("%s", exc)
                summary.interrupted, summary.stopped_by = True, str(exc)
            bar.close()
        summary.seconds = time.monotonic() - started
        return summary

    def _selected(self, walked: "_Walk", bar) -> Iterator[Item]:
        given = 0
        for task in walked:
            if self.stop.is_set() or (self.limit is not None and given >= self.limit):
                return
            item = self.job.select(task)
            if item is None:
                bar.update(1)
                continue
            given += 1
            yield item


class _Walk:
    """The project's tasks, remembering whether any arrived (a Label Studio error before that ends the run)."""

    def __init__(self, tasks: Iterable[dict]):
        self._tasks, self.started = tasks, False

    def __iter__(self) -> Iterator[dict]:
        for task in self._tasks:
            self.started = True
            yield task


class PrefetchedMedia:
    """Stands in for :class:`MediaFetcher` in a worker: the images fetched for its tasks.

    :meth:`fetch` answers the local file of a prefetched image, or raises the
    error its fetch raised, so the code after the fetch runs as if it had
    fetched itself (an image's identity is its URL and its content's digest,
    so a copy keys the same embedding). An image nobody prefetched is fetched
    here.

    Example:
        >>> media = PrefetchedMedia()
        >>> media.put_bytes("/data/upload/1/a.png", 7, b"png bytes", "a.png")
        >>> media.fetch("/data/upload/1/a.png", task_id=7).endswith(".png")
        True
        >>> media.clear()
    """

    def __init__(self, fallback: MediaFetcher | None = None):
        self.fallback = fallback
        self._directory: str | None = None
        self._files: dict[tuple[str, object], str | BaseException] = {}

    def put(self, url: str, task_id, path: str | None = None, error: BaseException | None = None) -> None:
        """Remember the image of ``(url, task_id)``: a local file, or the error its fetch raised."""
        self._files[(url, task_id)] = error if error is not None else path

    def put_bytes(self, url: str, task_id, content: bytes, name: str) -> None:
        """Remember an image fetched elsewhere (a Ray fetch task) by its bytes, kept in a file of its own."""
        if self._directory is None:
            self._directory = tempfile.mkdtemp(prefix="sam-media-")
        # Named by content: the same image for several tasks is one file.
        path = os.path.join(self._directory, hashlib.sha256(content).hexdigest() + os.path.splitext(name)[1])
        if not os.path.exists(path):
            partial = f"{path}.{os.getpid()}.part"
            with open(partial, "wb") as file:
                file.write(content)
            os.replace(partial, path)
        self.put(url, task_id, path)

    def fetch(self, url: str, task_id=None, credentials: Credentials | None = None) -> str:
        """A local path for ``url``, as :meth:`MediaFetcher.fetch`; raises what its fetch raised."""
        found = self._files.get((url, task_id))
        if found is None:
            self.fallback = self.fallback or MediaFetcher()
            return self.fallback.fetch(url, task_id=task_id, credentials=credentials)
        if isinstance(found, BaseException):
            raise found
        return found

    def clear(self) -> None:
        """Forget the batch's images and delete the copies made of them."""
        self._files.clear()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None


class InProcessExecutor:
    """Runs a job's worker in this process: images fetched ahead by threads, tasks in order, in batches.

    Args:
        batch_size: tasks per :meth:`TaskWorker.start_batch` (encoded together on a GPU).
        fetch_threads: parallel downloads, running this many tasks ahead of the model.
        fetcher: a :class:`MediaFetcher` (default: the server's media cache).
    """

    label = ""
    #: Never blocked where a Ctrl-C could not wait for the current task to end.
    waiting = False

    def __init__(self, batch_size: int = 1, fetch_threads: int = 4, fetcher: MediaFetcher | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size, self.fetch_threads = batch_size, max(1, fetch_threads)
        self.fetcher = fetcher or MediaFetcher()

    def session(self) -> contextlib.AbstractContextManager:
        """Nothing to start or stop for a run in this process."""
        return contextlib.nullcontext()

    def results(self, items: Iterable[Item], job: Job, stopped: Callable[[], bool]) -> Iterator[tuple[Item, dict]]:
        """``(item, result)`` for each item, in order, until ``stopped()``."""
        media = PrefetchedMedia(fallback=self.fetcher)
        worker = job.local_worker(media)
        credentials = job.credentials()
        pool = ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="sam-fetch")
        pending: deque[tuple[Item, Future | None]] = deque()
        ahead = max(self.batch_size, 2 * self.fetch_threads)
        source = iter(items)

        def fill() -> None:
            while len(pending) < ahead:
                item = next(source, None)
                if item is None:
                    return
                fetch = (pool.submit(self.fetcher.fetch, item.url, task_id=item.id, credentials=credentials)
                         if item.url else None)
                pending.append((item, fetch))

        try:
            fill()
            while pending and not stopped():
                batch = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
                fill()
                media.clear()
                for item, fetch in batch:
                    if fetch is not None:
                        error = fetch.exception()
                        media.put(item.url, item.id, None if error else fetch.result(), error)
                worker.start_batch([item for item, _ in batch])
                for item, _ in batch:
                    if stopped():
                        return
                    yield item, worker(item)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            media.clear()


def failure_reason(task_id, exc: BaseException) -> str:
    """Why a task failed, for the summary (logged here, with a traceback for a bug)."""
    if isinstance(exc, SamBackendError):
        logger.warning("Task %s failed: %s", task_id, exc)
        return str(exc)
    if isinstance(exc, OSError):
        logger.warning("Task %s failed: %s", task_id, exc)
        return f"cannot read the fetched image: {exc}"
    logger.error("Task %s failed", task_id, exc_info=exc)
    return f"{type(exc).__name__}: {exc}"
