"""Look-ahead: the images of the tasks an annotator will open next are encoded while they work on this one.

Annotators work through a project in Label Studio's order, and spend longer on
most images than an encode takes. When the backend sees a task (a click, or
the ``/predict`` of a task being opened), :class:`LookAhead` reads the next
``SAM_LOOKAHEAD`` unlabeled tasks of the project from Label Studio's task list
(the labeling stream's sequential order: by id), and queues their encodes
behind everything else in the worker's encode queue
(:meth:`~sam_backend.embeddings.tiers.EmbeddingTiers.look_ahead`).

- A click never waits for a look-ahead that has not started: look-aheads have
  the queue's lowest priority, and the queue takes the most urgent unit
  first. A click on an image whose look-ahead is queued takes it over.
- When the annotator jumps elsewhere, the look-aheads queued for the old
  place are dropped (:meth:`~sam_backend.embeddings.encode_queue.EncodeQueue.discard`).
- Workers encode each image once: a look-ahead gives up at once when another
  worker holds the image's store lock, or the store has it.
- Look-ahead embeddings are spares: kept only where that evicts nothing used
  in the last ``SAM_LOOKAHEAD_PROTECT_SECONDS``, and ranked to be evicted
  before anything used since.
- The task list is cached per project for ``SAM_LOOKAHEAD_LIST_SECONDS``, and
  read a page from where the annotator is, never whole.
- Without Label Studio's URL and a token, or when Label Studio refuses (401,
  403), fails (5xx) or times out, look-ahead is off for that project (one
  warning, and the reason on ``/health``) and tried again later; clicks are
  unaffected. A task whose image cannot be fetched is skipped and counted,
  and not tried again.

With a SAM 3 concept preset loaded, the first ``SAM_CONCEPT_LOOKAHEAD`` of
those tasks (default 1) also get SAM 3's vision features, in SAM 3's own encode
queue, so that the first phrase typed on the next task costs the decoder
alone. SAM 3's encode is long (tens of seconds on a CPU for ``sam3_pcs``)
and shares the CPU with the clicks: 0 turns it off.

Everything runs on one background thread per worker: a request only hands it
the project and task, and never waits.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

from prometheus_client import Counter

from sam_backend.embeddings.encode_queue import EncodeSkipped
from sam_backend.env import env_number
from sam_backend.errors import SamBackendError
from sam_backend.labelstudio.api import LabelStudioError, LabelStudioProject
from sam_backend.labelstudio.labelconfig import LabelConfig

logger = logging.getLogger(__name__)

#: Tasks encoded ahead of the annotator (``SAM_LOOKAHEAD``; 0 turns look-ahead off).
DEFAULT_DEPTH = 4
#: Of those, how many SAM 3 encodes too, when a concept preset is loaded (``SAM_CONCEPT_LOOKAHEAD``).
DEFAULT_CONCEPT_DEPTH = 1
#: Seconds a project's task list is reused before Label Studio is asked again (``SAM_LOOKAHEAD_LIST_SECONDS``).
DEFAULT_LIST_SECONDS = 30.0
#: Seconds an embedding that a click used is safe from a look-ahead's eviction (``SAM_LOOKAHEAD_PROTECT_SECONDS``).
DEFAULT_PROTECT_SECONDS = 600.0
#: Seconds before a project whose look-ahead is off (Label Studio refused or failed) is tried again.
RETRY_SECONDS = 300.0
#: Seconds a look-ahead waits for Label Studio's task list.
LIST_TIMEOUT = 5.0
#: Pages of already-labeled tasks read at most to find the next unlabeled ones.
MAX_PAGES = 5
#: Task ids remembered per project as failed (their image could not be fetched).
MAX_FAILED = 1000


@dataclass
class _Project:
    """What look-ahead knows of one project."""

    #: The task list from ``after`` on (unlabeled tasks, id order), when it was read, and whether
    #: it reached the project's last task.
    after: int | None = None
    listed: list[dict] = field(default_factory=list)
    listed_at: float = 0.0
    exhausted: bool = False
    #: Image key -> task id of the look-aheads queued or encoded for the current place.
    window: dict[str, int] = field(default_factory=dict)
    #: The look-aheads' futures, until they end.
    futures: list[Future] = field(default_factory=list)
    #: Tasks whose image could not be fetched.
    failed: OrderedDict = field(default_factory=OrderedDict)
    #: Why look-ahead is off for the project (None: on), and until when.
    off: str | None = None
    off_until: float = 0.0


class LookAhead:
    """Encodes the next tasks of a project behind the annotator's clicks (see the module's docstring).

    Args:
        backend: the :class:`~sam_backend.server.backend.SamBackend` whose
            model, media fetcher and credentials it uses.
        depth: tasks encoded ahead; default ``SAM_LOOKAHEAD``, else 4.
        list_seconds: how long a project's task list is reused.
        protect_seconds: how long an embedding a click used is safe from look-ahead evictions.

    Example:
        >>> lookahead = LookAhead(backend, depth=4)  # doctest: +SKIP
        >>> lookahead.saw(project=3, task_id=118, config=config)  # returns at once  # doctest: +SKIP
        >>> lookahead.wait_idle(); lookahead.status()  # doctest: +SKIP
        {'depth': 4, 'projects': {'3': 'on'}}
    """

    def __init__(self, backend, depth: int | None = None, list_seconds: float | None = None,
                 protect_seconds: float | None = None):
        self.backend = backend
        self.depth = max(0, int(depth if depth is not None else env_number("SAM_LOOKAHEAD", DEFAULT_DEPTH)))
        self.list_seconds = (list_seconds if list_seconds is not None
                             else env_number("SAM_LOOKAHEAD_LIST_SECONDS", DEFAULT_LIST_SECONDS))
        self.protect_seconds = (protect_seconds if protect_seconds is not None
                                else env_number("SAM_LOOKAHEAD_PROTECT_SECONDS", DEFAULT_PROTECT_SECONDS))
        self.concept_depth = max(0, int(env_number("SAM_CONCEPT_LOOKAHEAD", DEFAULT_CONCEPT_DEPTH)))
        self.concept_encodes = Counter("sam_lookahead_concept_encodes",
                                       "Images whose SAM 3 features were encoded ahead of the annotator", registry=None)
        self.encodes = Counter("sam_lookahead_encodes", "Images encoded ahead of the annotator", registry=None)
        self.hits = Counter("sam_lookahead_hits", "First clicks served by a look-ahead embedding", registry=None)
        self.waste = Counter("sam_lookahead_waste",
                             "Look-ahead embeddings the annotator passed or jumped over without a click",
                             registry=None)
        self.skipped = Counter("sam_lookahead_skipped",
                               "Tasks not encoded ahead: image not fetched, or no room in the budgets",
                               ["reason"], registry=None)
        # Look-ahead embeddings not clicked yet, for every worker (the first click on one is a hit).
        self._spares = backend.shared.map("lookahead", ttl=self.protect_seconds)
        self._projects: dict[str, _Project] = {}
        self._clients: dict[tuple, LabelStudioProject] = {}
        self._lock = threading.Lock()
        self._events: queue.Queue = queue.Queue()
        self._latest: dict[str, tuple[int, LabelConfig]] = {}
        self._busy = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ requests

    def saw(self, project, task_id, config: LabelConfig) -> None:
        """The annotator is on ``task_id`` of ``project``: look ahead from there (in the background)."""
        if self.depth <= 0 or project in (None, "") or not isinstance(task_id, int):
            return
        key = str(project)
        with self._lock:
            fresh = key not in self._latest
            self._latest[key] = (task_id, config)  # a newer place replaces one not handled yet
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="sam-lookahead", daemon=True)
                self._thread.start()
        if fresh:
            self._events.put(key)

    def clicked(self, image_key: str) -> None:
        """A click used ``image_key``'s embedding: a hit if a look-ahead (of any worker) encoded it."""
        if self.depth <= 0 or self._spares.get(image_key) is None:
            return
        self._spares.delete(image_key)
        self.hits.inc()

    def status(self) -> dict:
        """For ``/health``: the depth, and each project's state (``on``, or why it is off)."""
        with self._lock:
            projects = {key: state.off or "on" for key, state in self._projects.items()}
        return {"depth": self.depth, "projects": projects}

    def collect(self):
        """The look-ahead counters, for a registry collector."""
        for counter in (self.encodes, self.hits, self.waste, self.skipped, self.concept_encodes):
            yield from counter.collect()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until every place seen so far has been handled and its encodes have ended (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                pending = bool(self._latest) or self._busy.is_set()
                futures = [f for state in self._projects.values() for f in state.futures]
            if not pending and all(f.done() for f in futures):
                return True
            time.sleep(0.02)
        return False

    # ------------------------------------------------------------ the thread

    def _work(self) -> None:
        while True:
            key = self._events.get()
            with self._lock:
                self._busy.set()
                task_id, config = self._latest.pop(key)
            try:
                self._look_ahead(key, task_id, config)
            except Exception:  # never the worker's end: the next place is looked at afresh
                logger.exception("Look-ahead for project %s failed", key)
            finally:
                self._busy.clear()

    def _look_ahead(self, key: str, task_id: int, config: LabelConfig) -> None:
        with self._lock:
            state = self._projects.setdefault(key, _Project())
        if state.off is not None and time.monotonic() < state.off_until:
            return
        tasks = self._next_tasks(key, state, task_id)
        if tasks is None:
            return
        wanted = [task for task in tasks if task["id"] not in state.failed][: self.depth]
        self._leave(key, state, task_id, {task["id"] for task in wanted})
        state.futures = [f for f in state.futures if not f.done()]
        for index, task in enumerate(wanted):
            if task["id"] in state.window.values():
                continue
            self._schedule(key, state, task, config, concepts=index < self.concept_depth)

    def _next_tasks(self, key: str, state: _Project, task_id: int) -> list[dict] | None:
        """The unlabeled tasks after ``task_id`` (from the cached list when it still covers them), or None: off."""
        now = time.monotonic()
        if state.after is not None and state.after <= task_id and now - state.listed_at < self.list_seconds:
            remaining = [task for task in state.listed if task["id"] > task_id]
            if len(remaining) >= self.depth or state.exhausted:
                return remaining
        client = self._client(key)
        if client is None:
            self._turn_off(key, state, "no Label Studio URL and token: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
            return None
        found: list[dict] = []
        page_size, exhausted = 2 * self.depth, True  # a little more than needed: the list is reused
        try:
            for read, task in enumerate(client.tasks_after(task_id, page_size=page_size), start=1):
                if not task.get("is_labeled"):
                    found.append({"id": int(task["id"]), "data": task.get("data") or {}})
                if len(found) >= page_size or read >= MAX_PAGES * page_size:
                    exhausted = False
                    break
        except LabelStudioError as exc:
            status = getattr(exc.__cause__, "status_code", None)
            self._turn_off(key, state, f"Label Studio answered {status}: {exc}" if status else str(exc))
            return None
        if state.off is not None:
            logger.info("Look-ahead for project %s is on again", key)
        state.off, state.after, state.listed, state.listed_at, state.exhausted = None, task_id, found, now, exhausted
        return found

    def _client(self, key: str) -> LabelStudioProject | None:
        credentials = self.backend.credentials_for(key)
        if not (credentials.hostname and credentials.token):
            return None
        client_key = (credentials.hostname, credentials.token, key)
        if client_key not in self._clients:
            try:
                self._clients[client_key] = LabelStudioProject(credentials.hostname, credentials.token, int(key),
                                                               retries=0, timeout=LIST_TIMEOUT)
            except (LabelStudioError, ValueError):
                return None
        return self._clients[client_key]

    def _turn_off(self, key: str, state: _Project, reason: str) -> None:
        if state.off != reason:
            logger.warning("Look-ahead is off for project %s for %.0f s: %s", key, RETRY_SECONDS, reason)
        with self._lock:
            state.off, state.off_until = reason, time.monotonic() + RETRY_SECONDS

    def _leave(self, key: str, state: _Project, task_id: int, keep: set[int]) -> None:
        """Drop the look-aheads of tasks outside the new window: queued ones leave the queue, encoded ones are waste."""
        gone = {image: task for image, task in state.window.items() if task not in keep}
        if not gone:
            return
        dropped = self.backend.holder.embeddings().queue.discard(gone)
        concepts = self._concept_tiers()
        if concepts is not None:
            concepts.queue.discard(gone)
        wasted = 0
        with self._lock:
            for image in gone:
                del state.window[image]
        for image, task in gone.items():
            # The task the annotator is on now is about to be clicked (a hit), not waste.
            if task != task_id and self._spares.get(image) is not None:
                self._spares.delete(image)
                wasted += 1
        if wasted:
            self.waste.inc(wasted)
        if dropped:
            logger.info("Project %s: the annotator moved; %d queued look-ahead(s) dropped", key, dropped)

    def _concept_tiers(self):
        """SAM 3's embedding tiers when its model is loaded and look-ahead asked of it, else None."""
        holder = getattr(self.backend, "concepts", None)
        return holder.loaded_embeddings if holder is not None and self.concept_depth > 0 else None

    def _schedule(self, key: str, state: _Project, task: dict, config: LabelConfig, concepts: bool = False) -> None:
        url = task["data"].get(config.image_key)
        task_id = task["id"]
        if not isinstance(url, str) or not url:
            return
        try:
            image_key, loader = self.backend.image_source(url, task_id, key)
        except SamBackendError as exc:
            self._fail(state, task_id, "fetch", exc)
            return
        tiers = self.backend.holder.embeddings()
        future = tiers.look_ahead(image_key, loader, self.protect_seconds)
        with self._lock:
            state.window[image_key] = task_id
            state.futures.append(future)
        future.add_done_callback(lambda done: self._settled(key, state, image_key, task_id, done))
        concept_tiers = self._concept_tiers() if concepts else None
        if concept_tiers is not None:
            ahead = concept_tiers.look_ahead(image_key, loader, self.protect_seconds)
            with self._lock:
                state.futures.append(ahead)
            ahead.add_done_callback(lambda done: self._concept_settled(key, task_id, done))

    def _concept_settled(self, key: str, task_id: int, done: Future) -> None:
        if done.exception() is None and done.result() == "encoded":
            self.concept_encodes.inc()
            logger.info("Project %s: task %s's SAM 3 features encoded ahead of the annotator", key, task_id)

    def _settled(self, key: str, state: _Project, image_key: str, task_id: int, done: Future) -> None:
        error = done.exception()
        if isinstance(error, EncodeSkipped):
            return  # dropped: the annotator moved
        if error is not None:
            self._fail(state, task_id, "image", error)
            return
        outcome = done.result()
        if outcome == "encoded":
            self.encodes.inc()
            self._spares.put(image_key, str(task_id).encode())
            logger.info("Project %s: task %s encoded ahead of the annotator", key, task_id)
        elif outcome == "no room":
            self.skipped.labels("budget").inc()
            logger.info("Project %s: task %s encoded ahead but not kept: the embedding budgets hold only "
                        "recently used embeddings", key, task_id)

    def _fail(self, state: _Project, task_id: int, reason: str, error: BaseException) -> None:
        self.skipped.labels(reason).inc()
        logger.info("Look-ahead skips task %s: %s", task_id, error)
        with self._lock:
            state.failed[task_id] = True
            while len(state.failed) > MAX_FAILED:
                state.failed.popitem(last=False)
