"""``--ray``: the model work of ``preannotate`` and ``precompute`` in a Ray Data actor pool.

One machine encodes a few images a second at best; a project may hold a
hundred thousand. :class:`RayExecutor` is the executor of
:class:`~sam_backend.commands.runner.ProjectRunner` that spreads the per-task
work over a Ray cluster (or a local Ray instance) as one streaming Ray Data
pipeline: parallel Ray tasks fetch the images (:func:`fetch_images`, the same
:class:`~sam_backend.labelstudio.media.MediaFetcher`), and an actor pool runs
the job's own worker (each actor builds it once, loading the preset), with the
fetched files standing in where it would fetch them. The runner does the rest
(which tasks, uploads, Ctrl-C, the summary) as for a run in one process. This
module holds only what is Ray's: the cluster connection, the pipeline's
stages and the actor pool's resources.

Ray Data schedules, streams and applies backpressure; nothing here schedules.
Ray is an optional extra (``pip install 'sam-backend[ray]'``), imported only
when a run asks for it: without it, :func:`require_ray` says which extra to
install.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from sam_backend.commands.runner import Item, Job, PrefetchedMedia, RunFailed, WorkerFailed
from sam_backend.errors import SamBackendError, StoreError
from sam_backend.labelstudio.media import Credentials, MediaFetcher

logger = logging.getLogger(__name__)

#: ``--ray`` without an address: start a Ray instance on this machine (Ray's own name for it).
LOCAL = "local"
#: What to install when Ray is missing.
RAY_EXTRA = "pip install 'sam-backend[ray]'"
#: Environment the workers need as the driver has it (a worker on another node has its own):
#: the backend's settings, model downloads, media access, proxies. Credentials travel as arguments.
FORWARDED_ENV_PREFIXES = ("SAM_", "KERAS_", "KAGGLE", "HF_", "LOCAL_FILES_", "TF_CPP_")
FORWARDED_ENV = ("MODEL_DIR", "LOG_LEVEL", "LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "HTTP_PROXY", "HTTPS_PROXY",
                 "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
#: Tasks per block of the pipeline (a fetch task fetches one block; on CPUs an actor takes a block
#: at a time): enough to amortise Ray's per-task cost, few enough that a small project spreads over
#: every actor and a large one ends evenly.
BLOCK_TASKS = 4
#: Seconds between the driver's progress log lines (``--log-level INFO``; for clusters without a terminal).
PROGRESS_LOG_SECONDS = 30.0


class RayUnavailableError(SamBackendError):
    """Ray is not installed, or the cluster cannot be reached."""


def require_ray():
    """The ``ray`` module, with Ray Data.

    Raises:
        RayUnavailableError: Ray is not installed; the message names the extra.
    """
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the [data] extra of ray)
    except ImportError as exc:
        raise RayUnavailableError(
            f"--ray needs Ray Data, which is not installed ({exc}). Install the ray extra: {RAY_EXTRA}"
        ) from None
    return ray


def forwarded_env(environ=None) -> dict[str, str]:
    """The driver's variables that the workers must see (:data:`FORWARDED_ENV_PREFIXES`, :data:`FORWARDED_ENV`)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV}


@dataclass(frozen=True)
class RayOptions:
    """Where a ``--ray`` run goes and how wide.

    Attributes:
        address: :data:`LOCAL` starts a Ray instance on this machine;
            ``"auto"``, ``"ray://head:10001"``... join that cluster.
        actors: model workers; each loads the preset once.
        cpus_per_actor: CPUs each worker reserves (Ray sets its torch threads to as many).
        gpus_per_actor: GPUs each worker reserves (0.5: two workers share a GPU).
        fetch_tasks: image fetching tasks running at once.
        log_level: the workers' logging level.

    Example:
        >>> RayOptions(address="auto", actors=8, gpus_per_actor=1).actor_args(tasks=1000, batch_size=16)["batch_size"]
        16
    """

    address: str = LOCAL
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    fetch_tasks: int = 4
    log_level: str = "WARNING"

    def actor_args(self, tasks: int, batch_size: int = 1) -> dict:
        """``map_batches`` arguments of the model workers' stage, for ``tasks`` tasks.

        On GPUs a call takes ``batch_size`` tasks (their images go through
        the encoder together); on CPUs one, so that every actor has work.
        No more actors start than there are blocks to give them.
        """
        import ray.data

        actors = max(1, min(self.actors, _blocks(tasks)))
        return {"compute": ray.data.ActorPoolStrategy(size=actors), "num_cpus": self.cpus_per_actor,
                "num_gpus": self.gpus_per_actor or None, "batch_size": batch_size if self.gpus_per_actor else 1,
                "batch_format": "numpy", "runtime_env": {"env_vars": forwarded_env()}}

    def fetch_args(self, tasks: int) -> dict:
        """``map_batches`` arguments of the fetching stage.

        Fetching waits on the network: its tasks reserve no CPU, so that
        actors may take every core, and :attr:`fetch_tasks` bounds them instead.
        """
        import ray.data

        size = max(1, min(self.fetch_tasks, _blocks(tasks)))
        return {"compute": ray.data.TaskPoolStrategy(size=size), "num_cpus": 0, "batch_size": None,
                "batch_format": "numpy", "runtime_env": {"env_vars": forwarded_env()}}


@contextlib.contextmanager
def ray_session(address: str = LOCAL) -> Iterator[object]:
    """Ray for one run: started or joined here and left at the end, or the caller's own, left running.

    Raises:
        RayUnavailableError: Ray is not installed, or ``address`` cannot be reached.
    """
    ray = require_ray()
    if ray.is_initialized():  # a notebook's or a test's Ray: theirs to shut down
        yield ray
        return
    _check_reachable(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except Exception as exc:  # ConnectionError, a malformed address, a version mismatch...
        what = "start Ray on this machine" if address == LOCAL else f"join the Ray cluster at {address}"
        raise RayUnavailableError(f"Cannot {what}: {exc}") from exc
    resources = ray.cluster_resources()
    where = "started on this machine" if address == LOCAL else f"cluster at {address}"
    logger.info("Ray %s: %g CPU(s), %g GPU(s); worker logs in /tmp/ray/session_latest/logs on each node",
                where, resources.get("CPU", 0), resources.get("GPU", 0))
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a ``host:port`` (or ``ray://host:port``) nobody answers: Ray itself retries for minutes."""
    from urllib.parse import urlsplit

    if address in (LOCAL, "auto") or ":" not in address:
        return
    parts = urlsplit(address if "://" in address else f"ray-gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        return  # let Ray say what is wrong with it
    if not host or not port:
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise RayUnavailableError(f"Cannot join the Ray cluster at {address}: {host}:{port} does not answer ({exc}). "
                                  "Is Ray running there (ray start --head)?") from None


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Ray Data's per-stage bars off during a run: the driver's own bar counts tasks, with rate and ETA."""
    import ray.data

    context = ray.data.DataContext.get_current()
    previous = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = previous


def _dataset(rows: list[dict]):
    """The pipeline's input, in blocks of :data:`BLOCK_TASKS` rows (a single block would go to a single actor)."""
    import ray.data

    return ray.data.from_items(rows, override_num_blocks=_blocks(len(rows)))


def _blocks(tasks: int) -> int:
    return max(1, -(-tasks // BLOCK_TASKS))


def _column(values: list) -> np.ndarray:
    """A batch column of Python objects (bytes, str), never split into a second axis."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def _pickled_error(exc: BaseException) -> bytes:
    """The exception, to be raised again in a model worker; one that does not survive pickling as its message."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(SamBackendError(f"{type(exc).__name__}: {exc}"))


def fetch_images(batch: dict[str, np.ndarray], url: str, api_key: str) -> dict[str, np.ndarray]:
    """A Ray task: fetch the images of a batch of tasks with the single-machine run's :class:`MediaFetcher`.

    ``batch`` has ``id`` and ``url`` (empty: nothing to fetch) columns; adds
    ``image`` (the file's bytes), ``name`` (its file name) and ``fetch_error``
    (the pickled exception of a fetch that failed). Nothing here raises for a
    task: its error is raised again in the model worker, where the
    single-machine run would meet it.
    """
    fetcher = MediaFetcher()
    credentials = Credentials(url, api_key)
    images, names, errors = [], [], []
    for task_id, image_url in zip(batch["id"], batch["url"]):
        content, name, error = b"", "", b""
        if image_url:
            try:
                path = fetcher.fetch(str(image_url), task_id=int(task_id), credentials=credentials)
                with open(path, "rb") as file:
                    content = file.read()
                name = os.path.basename(path)
            except Exception as exc:
                error = _pickled_error(exc)
        images.append(content)
        names.append(name)
        errors.append(error)
    return {**batch, "image": _column(images), "name": _column(names), "fetch_error": _column(errors)}


class _Stream:
    """The driver's side of a pipeline: its result rows, a Ctrl-C that ends the wait for the next one,
    and a progress line in the log every :data:`PROGRESS_LOG_SECONDS` (the bar needs a terminal)."""

    def __init__(self, dataset, total: int):
        self._rows = iter(dataset.iter_rows())
        self.waiting = False
        self.total, self.seen = total, 0
        self._started = self._logged = time.monotonic()

    def progress(self) -> None:
        """Count a row; now and then log how far the run is."""
        self.seen += 1
        now = time.monotonic()
        if now - self._logged >= PROGRESS_LOG_SECONDS or self.seen == self.total:
            self._logged = now
            logger.info("%d of %d task(s) done on Ray, %.2f task/s", self.seen, self.total,
                        self.seen / max(now - self._started, 1e-9))

    def __iter__(self) -> Iterator[dict]:
        while True:
            self.waiting = True
            try:
                row = next(self._rows, None)
            except (KeyboardInterrupt, SamBackendError):
                raise
            except Exception as exc:  # a worker died, the cluster went away...
                raise RunFailed(f"the Ray job failed: {type(exc).__name__}: {exc}") from exc
            finally:
                self.waiting = False
            if row is None:
                return
            yield row

    def close(self) -> None:
        """Stop the pipeline: what is in flight is dropped."""
        close = getattr(self._rows, "close", None)
        if close is not None:
            close()


class _ActorWorker:
    """A Ray actor around a job's worker: built once (the model loads here), then called on batches of rows.

    A worker that cannot be built or cannot go on (:class:`WorkerFailed`, a
    store that cannot be written) is not raised, or Ray would restart the
    actor again and again: each row says so in ``fatal``, and the driver
    stops the run with it.
    """

    def __init__(self, factory: Callable, kwargs: dict):
        self.media = PrefetchedMedia()
        self.fatal = ""
        try:
            self.worker = factory(media=self.media, **kwargs)
        except Exception as exc:
            self.fatal = str(exc) if isinstance(exc, SamBackendError) else f"{type(exc).__name__}: {exc}"
            logger.error("%s", self.fatal)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``item`` (as given), ``result`` (pickled; empty when fatal) and ``fatal`` per row."""
        count = len(batch["id"])
        results, fatal = [b""] * count, [self.fatal] * count
        if not self.fatal:
            items = [pickle.loads(data) for data in batch["item"]]
            for item, content, name, error in zip(items, batch["image"], batch["name"], batch["fetch_error"]):
                if len(error):
                    self.media.put(item.url, item.id, error=pickle.loads(error))
                elif item.url:
                    self.media.put_bytes(item.url, item.id, bytes(content), str(name))
            try:
                self.worker.start_batch(items)
                for index, item in enumerate(items):
                    try:
                        results[index] = pickle.dumps(self.worker(item))
                    except (WorkerFailed, StoreError) as exc:  # every later task would fail too
                        fatal[index:] = [str(exc)] * (count - index)
                        break
            finally:
                self.media.clear()
        return {"item": batch["item"], "result": _column(results), "fatal": _column(fatal)}


class RayExecutor:
    """Runs a job's worker in a Ray Data actor pool (see the module's docstring).

    Args:
        options: the Ray cluster and the actor pool.
        batch_size: on GPUs, tasks per actor call (their images encoded together).

    Example:
        >>> executor = RayExecutor(RayOptions("auto", actors=8, gpus_per_actor=1), batch_size=16)  # doctest: +SKIP
        >>> Preannotator(backend, project, PrelabelSettings(), executor=executor).run().exit_code  # doctest: +SKIP
        0
    """

    def __init__(self, options: RayOptions, batch_size: int = 1):
        self.options, self.batch_size = options, batch_size
        self.log_level = options.log_level
        self.label = " (ray)"
        self._stream: _Stream | None = None

    @property
    def waiting(self) -> bool:
        """Blocked on the cluster for the next result (a Ctrl-C then stops at once)."""
        return self._stream is not None and self._stream.waiting

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Ray for the run (:func:`ray_session`), its per-stage progress bars off.

        Raises:
            RayUnavailableError: Ray is missing or its cluster cannot be reached.
        """
        with ray_session(self.options.address), _quiet_progress_bars():
            yield

    def results(self, items: Iterable[Item], job: Job, stopped: Callable[[], bool]) -> Iterator[tuple[Item, dict]]:
        """``(item, result)`` as the actors finish them.

        Raises:
            WorkerFailed: a worker cannot be built, or cannot go on.
            RunFailed: the Ray job failed.
        """
        rows = [{"id": item.id, "url": item.url, "item": pickle.dumps(item)} for item in items]
        if not rows or stopped():
            return
        logger.info("%d task(s) for Ray", len(rows))
        factory, kwargs = job.remote_worker()
        credentials = job.credentials()
        media = {"url": credentials.hostname, "api_key": credentials.token}
        dataset = (_dataset(rows)
                   .map_batches(fetch_images, fn_kwargs=media, **self.options.fetch_args(len(rows)))
                   .map_batches(_ActorWorker, fn_constructor_kwargs={"factory": factory, "kwargs": kwargs},
                                **self.options.actor_args(len(rows), self.batch_size)))
        self._stream = _Stream(dataset, len(rows))
        try:
            for row in self._stream:
                if row["fatal"]:
                    raise WorkerFailed(row["fatal"])
                self._stream.progress()
                yield pickle.loads(row["item"]), pickle.loads(row["result"])
        finally:
            self._stream.close()
            self._stream = None
