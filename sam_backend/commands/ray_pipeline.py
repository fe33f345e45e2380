"""``--ray``: ``preannotate`` and ``precompute`` past one machine, on a Ray cluster.

One machine encodes a few images a second at best; a project may hold a
hundred thousand. With ``--ray`` the same run is spread over a Ray cluster (or
a local Ray instance) as one streaming Ray Data pipeline:

1. the driver (this process) lists the project's tasks through
   label-studio-sdk and leaves out those that already have our model
   version's prediction, as the single-machine run does;
2. parallel Ray tasks fetch the images (:func:`fetch_images`, the same
   :class:`~sam_backend.labelstudio.media.MediaFetcher`) and hand on each
   image's bytes, or the error its fetch raised;
3. an actor pool of model workers (:class:`PrelabelWorker`,
   :class:`PrecomputeWorker`) loads the preset once per actor, builds what
   the single-machine run builds (a :class:`~sam_backend.server.backend.SamBackend`,
   or :class:`~sam_backend.embeddings.tiers.EmbeddingTiers`) on the same
   embedding store settings, and runs the same per-task functions
   (:func:`.preannotate.predict_or_reason`, :func:`.precompute.store_image`),
   the fetched file standing in where they would fetch it
   (:class:`PrefetchedMedia`): so a task gets the same regions, or fails
   with the same reason;
4. the driver uploads predictions in batches (the SDK's retries) and counts
   the same summary, so flags, resumability and exit codes do not change.

Ray Data schedules, streams and applies backpressure; nothing here schedules.
Ray is an optional extra (``pip install 'sam-backend[ray]'``), imported only
when a run asks for it: without it, :func:`require_ray` says which extra to
install.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from sam_backend.commands.precompute import (PrecomputeSummary, failure_reason, image_data_key, stop_resumably,
                                             store_image)
from sam_backend.commands.preannotate import (Summary, encode_together, our_predictions, predict_or_reason,
                                              upload_predictions)
from sam_backend.errors import SamBackendError, StoreError
from sam_backend.labelstudio.api import LabelStudioError, LabelStudioProject
from sam_backend.labelstudio.labelconfig import parse_label_config
from sam_backend.labelstudio.media import Credentials, MediaFetcher
from sam_backend.logs import configure_logging
from sam_backend.server.prelabel import PrelabelSettings

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


class RayRunError(SamBackendError):
    """The Ray job itself failed (a worker died, the cluster went away)."""


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


class PrefetchedMedia:
    """Stands in for :class:`MediaFetcher` in a model worker: what the fetch tasks fetched.

    :meth:`fetch` answers a local copy of a prefetched image, or raises the
    error its fetch raised, so the code after the fetch runs as in the
    single-machine run (an image's identity is its URL and its content's
    digest, so a copy keys the same embedding). An image nobody prefetched is
    fetched here.

    Example:
        >>> media = PrefetchedMedia()
        >>> media.put("/data/upload/1/a.png", 7, b"png bytes", "a.png")
        >>> media.fetch("/data/upload/1/a.png", task_id=7).endswith(".png")
        True
        >>> media.clear()
    """

    def __init__(self, fallback: MediaFetcher | None = None):
        self.directory = tempfile.mkdtemp(prefix="sam-ray-media-")
        self.fallback = fallback
        self._files: dict[tuple[str, object], str | BaseException] = {}

    def put(self, url: str, task_id, content: bytes, name: str, error: BaseException | None = None) -> None:
        """Remember the image of ``(url, task_id)``: its bytes, or the error its fetch raised."""
        if error is not None:
            self._files[(url, task_id)] = error
            return
        # Named by content: the same image for several tasks is one file.
        path = os.path.join(self.directory, hashlib.sha256(content).hexdigest() + os.path.splitext(name)[1])
        if not os.path.exists(path):
            partial = f"{path}.{os.getpid()}.part"
            with open(partial, "wb") as file:
                file.write(content)
            os.replace(partial, path)
        self._files[(url, task_id)] = path

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
        """Forget the batch's images and delete their copies."""
        self._files.clear()
        shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory, exist_ok=True)

    def put_batch(self, batch: dict[str, np.ndarray], task_ids: list) -> None:
        """:meth:`put` every fetched row of a batch from :func:`fetch_images`."""
        for task_id, url, content, name, error in zip(task_ids, batch["url"], batch["image"], batch["name"],
                                                      batch["fetch_error"]):
            if url:
                self.put(str(url), task_id, bytes(content), str(name), pickle.loads(error) if len(error) else None)


class PrelabelWorker:
    """A model worker: one :class:`SamBackend` on the preset, the predictions of batches of tasks.

    It loads the model as ``sam-backend preannotate`` does (``ModelHolder``,
    with the store that ``SAM_CACHE_URL`` / ``SAM_CACHE_DIR`` select) and
    calls :func:`.preannotate.predict_or_reason` per task. A model that cannot
    load is not raised (Ray would restart the actor again and again): each
    row says so in ``fatal`` and the driver stops the run with it.

    Args:
        preset: the keras-hub preset.
        credentials: Label Studio's URL and token (task media, as in the single-machine run).
        project: the project id.
        label_config: the project's label config XML.
        settings: what to predict.
        log_level: the worker's logging level.

    Example:
        >>> worker = PrelabelWorker("demo", Credentials(url, token), 3, config_xml, PrelabelSettings())  # doctest: +SKIP
        >>> worker(fetch_images(batch, url, token))["prediction"]  # doctest: +SKIP
    """

    def __init__(self, preset: str, credentials: Credentials, project: int, label_config: str,
                 settings: PrelabelSettings, log_level: str = "WARNING"):
        from sam_backend.server.backend import ModelHolder, SamBackend

        configure_logging(log_level)
        self.config = parse_label_config(label_config)
        self.settings, self.project = settings, project
        self.media = PrefetchedMedia()
        holder = ModelHolder(preset).start()
        holder.wait()
        self.fatal = ""
        try:
            holder.engine()
        except SamBackendError as exc:
            self.fatal = str(exc)
            logger.error("%s", exc)
        self.backend = SamBackend(holder=holder, fetcher=self.media, credentials=credentials)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``id``, ``prediction`` (pickled, empty when failed), ``error`` (the reason) and ``fatal`` per task."""
        count = len(batch["id"])
        if self.fatal:
            return {"id": batch["id"], "prediction": _column([b""] * count), "error": _column([""] * count),
                    "fatal": _column([self.fatal] * count)}
        tasks = [pickle.loads(data) for data in batch["task"]]
        predictions, errors = [], []
        self.media.put_batch(batch, [task.get("id") for task in tasks])
        try:
            encode_together(self.backend, tasks, self.config, self.project)
            for task in tasks:
                prediction, reason = predict_or_reason(self.backend, task, self.config, self.settings, self.project)
                predictions.append(pickle.dumps(prediction) if prediction is not None else b"")
                errors.append(reason or "")
        finally:
            self.media.clear()
        return {"id": batch["id"], "prediction": _column(predictions), "error": _column(errors),
                "fatal": _column([""] * count)}


class PrecomputeWorker:
    """A model worker that fills the embedding store: :func:`.precompute.store_image` per image.

    The store is the one ``sam-backend precompute`` opens (``SAM_CACHE_URL``,
    else ``cache_dir``): on a cluster, Redis or a directory every node
    shares. A model or store that cannot be used is reported in ``fatal``,
    as in :class:`PrelabelWorker`.

    Args:
        preset: the keras-hub preset.
        device: torch device (default ``SAM_DEVICE``, else CUDA when the actor has a GPU).
        cache_dir: the store's directory (default as for ``serve``).
        log_level: the worker's logging level.

    Example:
        >>> worker = PrecomputeWorker("demo", None, "/shared/embeddings")  # doctest: +SKIP
        >>> worker(fetch_images(batch, url, token))["outcome"]  # doctest: +SKIP
        array(['encoded', 'stored'], dtype=object)
    """

    def __init__(self, preset: str, device: str | None = None, cache_dir: str | None = None, log_level: str = "WARNING"):
        from sam_backend.embeddings.settings import open_store
        from sam_backend.embeddings.tiers import EmbeddingTiers
        from sam_backend.sam.engine import SamEngine

        configure_logging(log_level)
        self.media = PrefetchedMedia()
        self.fatal = ""
        try:
            store = open_store(cache_dir=cache_dir, required=True)
            engine = SamEngine.from_preset(preset, device=device)
            engine.warm_up()  # picks the precision a served worker on this hardware would: store keys agree
            self.embeddings = EmbeddingTiers(engine, store=store)
        except Exception as exc:
            self.fatal = str(exc) if isinstance(exc, SamBackendError) else f"{type(exc).__name__}: {exc}"
            logger.error("%s", self.fatal)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``id``, ``outcome`` (``encoded``, ``stored`` or ``failed``), ``error`` and ``fatal`` per task."""
        from sam_backend.embeddings.fingerprints import image_identity

        count = len(batch["id"])
        outcomes, errors, fatal = [], [], [self.fatal] * count
        task_ids = [int(task_id) for task_id in batch["id"]]
        if not self.fatal:
            self.media.put_batch(batch, task_ids)
        try:
            for index, (task_id, url) in enumerate(zip(task_ids, batch["url"])):
                outcome, error = "failed", ""
                if not fatal[index]:
                    url = str(url)
                    try:
                        path = self.media.fetch(url, task_id=task_id)
                        encoded = store_image(self.embeddings, image_identity(url, path), path, url, task_id)
                        outcome = "encoded" if encoded else "stored"
                    except StoreError as exc:  # every later image would fail too: the run stops
                        fatal[index:] = [str(exc)] * (count - index)
                    except Exception as exc:  # this task's fault, or a bug: reported, and the run goes on
                        error = failure_reason(task_id, exc)
                outcomes.append(outcome)
                errors.append(error)
        finally:
            self.media.clear()
        return {"id": batch["id"], "outcome": _column(outcomes), "error": _column(errors), "fatal": _column(fatal)}


class _Stream:
    """The driver's side of a pipeline: its result rows, a Ctrl-C that ends the wait for the next one,
    and a progress line in the log every :data:`PROGRESS_LOG_SECONDS` (the bar needs a terminal)."""

    def __init__(self, dataset, total: int):
        self._rows = iter(dataset.iter_rows())
        self.waiting = False
        self.total, self.seen = total, 0
        self._started = self._logged = time.monotonic()

    def progress(self, failed: int) -> None:
        """Count a row; now and then log how far the run is."""
        self.seen += 1
        now = time.monotonic()
        if now - self._logged >= PROGRESS_LOG_SECONDS or self.seen == self.total:
            self._logged = now
            logger.info("%d of %d task(s) done on Ray (%d failed), %.2f task/s", self.seen, self.total, failed,
                        self.seen / max(now - self._started, 1e-9))

    def __iter__(self) -> Iterator[dict]:
        while True:
            self.waiting = True
            try:
                row = next(self._rows, None)
            except (KeyboardInterrupt, SamBackendError):
                raise
            except Exception as exc:  # a worker died, the cluster went away...
                raise RayRunError(f"the Ray job failed: {type(exc).__name__}: {exc}") from exc
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


class RayPreannotator:
    """:class:`.preannotate.Preannotator` with the model on a Ray cluster: the same tasks, predictions and summary.

    Args:
        backend: names the model (preset, model version) and holds the
            credentials; its model is not loaded here but in each actor.
        project: the Label Studio project.
        settings: what to predict (mode, automatic mask settings).
        options: the Ray cluster and the actor pool.
        view, limit, overwrite, dry_run, batch_size, progress: as for
            :class:`.preannotate.Preannotator`; ``batch_size`` is also the
            tasks per actor call (their images encoded together) on GPUs.

    Example:
        >>> backend = SamBackend(preset="sam_base_sa1b", credentials=Credentials(url, token))  # doctest: +SKIP
        >>> runner = RayPreannotator(backend, project, PrelabelSettings(), RayOptions("auto", actors=8, gpus_per_actor=1))  # doctest: +SKIP
        >>> runner.run().exit_code  # doctest: +SKIP
        0
    """

    def __init__(self, backend, project: LabelStudioProject, settings: PrelabelSettings, options: RayOptions,
                 view: int | None = None, limit: int | None = None, overwrite: bool = False, dry_run: bool = False,
                 batch_size: int = 16, progress: bool = True):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.backend, self.project, self.settings, self.options = backend, project, settings, options
        self.view, self.limit, self.overwrite, self.dry_run = view, limit, overwrite, dry_run
        self.batch_size, self.progress = batch_size, progress
        self.stop = threading.Event()
        self._stream: _Stream | None = None

    def run(self) -> Summary:
        """Walk the project once; Ctrl-C (in the main thread) stops the job and uploads what is done.

        Raises:
            RayUnavailableError: Ray is missing or its cluster cannot be reached.
            LabelStudioError: the project cannot be read at all.
            SamBackendError: the model cannot be loaded in the workers.
        """
        with ray_session(self.options.address), _quiet_progress_bars():
            if threading.current_thread() is not threading.main_thread():
                return self._run()
            previous = signal.signal(signal.SIGINT, self._on_interrupt)
            try:
                return self._run()
            finally:
                signal.signal(signal.SIGINT, previous)

    def _on_interrupt(self, signum, frame) -> None:
        if self.stop.is_set() or (self._stream is not None and self._stream.waiting):
            raise KeyboardInterrupt  # a second Ctrl-C, or nothing to finish: stop now
        logger.warning("Stopping after the current task (Ctrl-C again to stop at once)...")
        self.stop.set()

    def _run(self) -> Summary:
        from tqdm import tqdm

        started = time.monotonic()
        summary = Summary()
        label_config = self.project.label_config()
        config = parse_label_config(label_config)
        self.settings.output.kinds(config)  # an output the config cannot take stops the run here, not per task
        version = self.backend.model_version
        total = self.project.count_tasks(self.view)
        bar = tqdm(total=min(total, self.limit) if self.limit else total, unit="task", disable=not self.progress,
                   dynamic_ncols=True, desc=f"project {self.project.project} (ray)")
        try:
            rows, replaced = [], {}
            for task in self.project.iter_tasks(self.view):
                if self.stop.is_set():
                    summary.interrupted, summary.stopped_by = True, "Ctrl-C"
                    break
                if self.limit is not None and len(rows) >= self.limit:
                    break
                ours = our_predictions(task, version)
                if ours and not self.overwrite:
                    summary.skipped += 1
                    bar.update(1)
                    continue
                url = (task.get("data") or {}).get(config.image_key)
                rows.append({"id": task["id"], "url": url if isinstance(url, str) else "", "task": pickle.dumps(task)})
                replaced[task["id"]] = [p["id"] for p in ours if "id" in p]
            if rows and not summary.interrupted:
                logger.info("%d task(s) to pre-annotate on Ray, %d skipped", len(rows), summary.skipped)
                self._stream_predictions(rows, replaced, label_config, summary, bar)
        except LabelStudioError as exc:
            # Retries are spent: Label Studio is down or refuses us. What is
            # uploaded stays; the next run resumes after it.
            logger.error("%s", exc)
            summary.interrupted, summary.stopped_by = True, str(exc)
        except RayRunError as exc:
            logger.error("%s", exc)
            summary.interrupted, summary.stopped_by = True, str(exc)
        finally:
            bar.close()
        summary.seconds = time.monotonic() - started
        return summary

    def _stream_predictions(self, rows: list[dict], replaced: dict, label_config: str, summary: Summary, bar) -> None:
        worker_args = {"preset": self.backend.preset, "credentials": self.backend.credentials,
                       "project": self.project.project, "label_config": label_config, "settings": self.settings,
                       "log_level": self.options.log_level}
        dataset = (_dataset(rows)
                   .map_batches(fetch_images, fn_kwargs=self._media_access(), **self.options.fetch_args(len(rows)))
                   .map_batches(PrelabelWorker, fn_constructor_kwargs=worker_args,
                                **self.options.actor_args(len(rows), self.batch_size)))
        uploads, deletions = [], []
        self._stream = _Stream(dataset, len(rows))
        try:
            for row in self._stream:
                if row["fatal"]:
                    raise SamBackendError(row["fatal"])
                task_id = int(row["id"])
                if row["error"]:
                    summary.failed[task_id] = row["error"]
                else:
                    uploads.append({"task": task_id, **pickle.loads(row["prediction"])})
                    deletions += replaced.get(task_id, [])
                bar.update(1)
                self._stream.progress(len(summary.failed))
                if self.stop.is_set():
                    summary.interrupted, summary.stopped_by = True, "Ctrl-C"
                    break
                if len(uploads) >= self.batch_size:
                    self._upload(uploads, deletions, summary, bar)
                    uploads, deletions = [], []
        except KeyboardInterrupt:
            summary.interrupted, summary.stopped_by = True, "Ctrl-C"
        finally:
            self._stream.close()
            self._stream = None
        self._upload(uploads, deletions, summary, bar)  # after Ctrl-C too: what is done is uploaded

    def _media_access(self) -> dict:
        credentials = self.backend.credentials
        return {"url": credentials.hostname or self.project.url, "api_key": credentials.token}

    def _upload(self, uploads: list[dict], deletions: list, summary: Summary, bar) -> None:
        upload_predictions(self.project, uploads, deletions, summary, bar, self.dry_run)


class RayPrecomputer:
    """:class:`.precompute.Precomputer` with the encoder on a Ray cluster: the same store entries and summary.

    Args:
        preset: the keras-hub preset (the server must use the same one).
        project: the Label Studio project.
        credentials: for task media (Label Studio's URL and token).
        options: the Ray cluster and the actor pool.
        view: only the tasks of this data manager view.
        data_key: the task data field with the image URL (default: from the label config).
        cache_dir: the store's directory (ignored with ``SAM_CACHE_URL``); on a
            cluster, one that every node shares.
        device: torch device of the workers.
        progress: show a progress bar.

    Example:
        >>> runner = RayPrecomputer("sam_base_sa1b", project, Credentials(url, token), RayOptions("auto", actors=4, gpus_per_actor=1))  # doctest: +SKIP
        >>> runner.run().lines()  # doctest: +SKIP
        ['120 task(s) in 95s: 118 encoded, 2 already stored, 0 without an image, 0 failed']
    """

    def __init__(self, preset: str, project: LabelStudioProject, credentials: Credentials, options: RayOptions,
                 view: int | None = None, data_key: str | None = None, cache_dir: str | None = None,
                 device: str | None = None, progress: bool = True):
        self.preset, self.project, self.credentials, self.options = preset, project, credentials, options
        self.view, self.data_key, self.cache_dir, self.device, self.progress = view, data_key, cache_dir, device, progress

    def run(self) -> PrecomputeSummary:
        """Walk the project once. Ctrl-C stops it; what is stored stays stored.

        Raises:
            RayUnavailableError: Ray is missing or its cluster cannot be reached.
            LabelStudioError: the project cannot be read at all.
            SamBackendError: the model or the store cannot be used in the workers.
        """
        from tqdm import tqdm

        with ray_session(self.options.address), _quiet_progress_bars():
            started = time.monotonic()
            summary = PrecomputeSummary()
            data_key = self.data_key or image_data_key(self.project.label_config())
            total = self.project.count_tasks(self.view)
            bar = tqdm(total=total, unit="image", disable=not self.progress, dynamic_ncols=True,
                       desc=f"project {self.project.project} (ray)")
            try:
                with stop_resumably(summary):
                    self._walk(data_key, summary, bar)
            except RayRunError as exc:
                summary.interrupted = True
                logger.error("%s", exc)
            finally:
                bar.close()
            summary.seconds = time.monotonic() - started
            return summary

    def _walk(self, data_key: str, summary: PrecomputeSummary, bar) -> None:
        rows = []
        for task in self.project.iter_tasks(self.view):
            url = (task.get("data") or {}).get(data_key)
            if isinstance(url, str) and url:
                rows.append({"id": task.get("id"), "url": url})
                continue
            summary.tasks += 1
            summary.no_image += 1
            logger.info("Task %s has no %r URL in its data; skipped.", task.get("id"), data_key)
            bar.update(1)
        if not rows:
            return
        worker_args = {"preset": self.preset, "device": self.device, "cache_dir": self.cache_dir,
                       "log_level": self.options.log_level}
        media = {"url": self.credentials.hostname or self.project.url, "api_key": self.credentials.token}
        dataset = (_dataset(rows)
                   .map_batches(fetch_images, fn_kwargs=media, **self.options.fetch_args(len(rows)))
                   .map_batches(PrecomputeWorker, fn_constructor_kwargs=worker_args, **self.options.actor_args(len(rows))))
        stream = _Stream(dataset, len(rows))
        try:
            for row in stream:
                if row["fatal"]:
                    raise SamBackendError(row["fatal"])  # the model or the store: no image can be stored
                summary.tasks += 1
                if row["outcome"] == "encoded":
                    summary.encoded += 1
                elif row["outcome"] == "stored":
                    summary.stored += 1
                else:
                    summary.failed[int(row["id"])] = row["error"]
                bar.update(1)
                stream.progress(len(summary.failed))
                bar.set_postfix(encoded=summary.encoded, stored=summary.stored, failed=len(summary.failed), refresh=False)
        finally:
            stream.close()
