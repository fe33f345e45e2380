"""Predictions that may take longer than Label Studio waits for them.

"Retrieve predictions" sends many tasks in one ``/predict`` and gives up after
100 s. :class:`PredictionJobs` computes tasks one after another on a
background thread; the request waits until its budget is spent and answers
with what is finished. What is not finished keeps going and is delivered when
ready (posted to Label Studio through its API) from a thread of its own, so
that a Label Studio that refuses or does not answer (the client retries with
backoff for half a minute or more) never holds up computing. Until it is
delivered it is kept, so that the next ``/predict`` for the task answers with
it at once (and it is not posted); one that cannot be delivered is logged as
an error and kept. A task already being computed, or being posted, is never
computed twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Hashable

logger = logging.getLogger(__name__)

#: Finished predictions kept when they could not be delivered.
KEEP_UNDELIVERED = 10_000


@dataclass
class _Job:
    key: Hashable
    compute: Callable[[], dict]
    deliver: Callable[[dict], None] | None = None
    result: dict | None = None
    error: Exception | None = None
    detached: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Outcome:
    """What became of one task within the budget.

    Attributes:
        prediction: the finished prediction, or None.
        error: why it failed, or None.
        pending: still computing; it will be delivered later.
    """

    prediction: dict | None = None
    error: Exception | None = None
    pending: bool = False


class PredictionJobs:
    """A background queue of per-task predictions with a time budget per request.

    Args:
        workers: threads computing predictions (1 keeps one CPU-bound model
            call at a time; interactive clicks run on the server's threads).

    Example:
        >>> jobs = PredictionJobs()
        >>> [o.prediction for o in jobs.run([("t1", lambda: {"result": []}, None)], budget=5)]
        [{'result': []}]
    """

    def __init__(self, workers: int = 1):
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sam-prelabel")
        self._poster = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam-deliver")
        self._lock = threading.Lock()
        self._active: dict[Hashable, _Job] = {}
        self._delivering: set[Hashable] = set()  # being posted now
        self._posts = 0  # deliveries queued or running
        self._undelivered: OrderedDict[Hashable, dict] = OrderedDict()

    @property
    def pending(self) -> int:
        """Tasks queued, computing, or waiting to be delivered."""
        with self._lock:
            return len(self._active) + self._posts

    def run(self, items, budget: float) -> list[Outcome]:
        """Compute ``items`` (``(key, compute, deliver)``), answering within ``budget`` seconds.

        ``compute()`` returns a prediction; ``deliver(prediction)`` is called
        for those finished after the budget (None: keep them for the next call).
        Outcomes are in the order of ``items``.
        """
        deadline = time.monotonic() + max(0.0, budget)
        jobs: list[_Job | dict | Outcome] = []
        with self._lock:
            for key, compute, deliver in items:
                if key in self._undelivered:
                    jobs.append(self._undelivered.pop(key))
                    continue
                if key in self._delivering:
                    # On its way to Label Studio: answered there, not twice.
                    jobs.append(Outcome(pending=True))
                    continue
                job = self._active.get(key)
                if job is not None:
                    with job.lock:
                        # This request answers with it if it finishes in time.
                        job.detached = False
                else:
                    job = _Job(key, compute, deliver)
                    self._active[key] = job
                    self._executor.submit(self._work, job)
                jobs.append(job)
        waiting = [j.done for j in jobs if isinstance(j, _Job)]
        for event in waiting:
            if not event.wait(max(0.0, deadline - time.monotonic())):
                break
        outcomes = []
        for job in jobs:
            if isinstance(job, Outcome):
                outcomes.append(job)
                continue
            if isinstance(job, dict):
                outcomes.append(Outcome(prediction=job))
                continue
            with job.lock:
                if job.done.is_set():
                    outcomes.append(Outcome(prediction=job.result, error=job.error))
                else:
                    job.detached = True
                    outcomes.append(Outcome(pending=True))
        return outcomes

    def _work(self, job: _Job) -> None:
        try:
            result, error = job.compute(), None
        except Exception as exc:  # reported to the request, or logged when detached
            result, error = None, exc
        # One step for both locks (in run's order): a request never finds the
        # job done but still active, or answers with it while it is delivered.
        with self._lock:
            self._active.pop(job.key, None)
            with job.lock:
                job.result, job.error = result, error
                job.done.set()
                detached = job.detached
            if not detached:
                return
            if error is None:
                # Kept while it waits for the poster: a request meanwhile answers with it.
                self._keep(job.key, result)
                if job.deliver is None:
                    return
                self._posts += 1
        if error is not None:
            logger.warning("Task %s failed after the request's budget: %s", job.key, error)
            return
        self._poster.submit(self._deliver, job)

    def _deliver(self, job: _Job) -> None:
        """Post one kept prediction (the poster's thread); kept again if that fails."""
        with self._lock:
            result = self._undelivered.pop(job.key, None)
            if result is None:  # a request answered with it meanwhile
                self._posts -= 1
                return
            self._delivering.add(job.key)
        delivered = False
        try:
            # Retried with backoff inside (label-studio-sdk, sam_backend.labelstudio.api);
            # what is raised is final, and names the task.
            job.deliver(result)
            delivered = True
        except Exception as exc:
            logger.error("A prediction finished after the request's budget could not be delivered: %s; "
                         "kept for the next request for its task", str(exc) or type(exc).__name__)
        finally:
            with self._lock:
                self._delivering.discard(job.key)
                self._posts -= 1
                if not delivered:
                    self._keep(job.key, result)

    def _keep(self, key: Hashable, result: dict) -> None:
        """Keep an undelivered prediction for the next request (the caller holds the lock)."""
        self._undelivered[key] = result
        while len(self._undelivered) > KEEP_UNDELIVERED:
            self._undelivered.popitem(last=False)

    def shutdown(self) -> None:
        """Stop taking work; running jobs and deliveries finish."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._poster.shutdown(wait=False)
