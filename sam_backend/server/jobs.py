"""Predictions that may take longer than Label Studio waits for them.

"Retrieve predictions" sends many tasks in one ``/predict`` and gives up after
100 s. :class:`PredictionJobs` computes tasks one after another on a
background thread; the request waits until its budget is spent and answers
with what is finished. What is not finished keeps going and is delivered when
ready (posted to Label Studio through its API); until it is delivered, it is
kept, so that the next ``/predict`` for the task answers with it at once.
A task already being computed is never computed twice.
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
        self._lock = threading.Lock()
        self._active: dict[Hashable, _Job] = {}
        self._undelivered: OrderedDict[Hashable, dict] = OrderedDict()

    @property
    def pending(self) -> int:
        """Tasks queued or computing."""
        with self._lock:
            return len(self._active)

    def run(self, items, budget: float) -> list[Outcome]:
        """Compute ``items`` (``(key, compute, deliver)``), answering within ``budget`` seconds.

        ``compute()`` returns a prediction; ``deliver(prediction)`` is called
        for those finished after the budget (None: keep them for the next call).
        Outcomes are in the order of ``items``.
        """
        deadline = time.monotonic() + max(0.0, budget)
        jobs: list[_Job | dict] = []
        with self._lock:
            for key, compute, deliver in items:
                if key in self._undelivered:
                    jobs.append(self._undelivered.pop(key))
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
        with job.lock:
            job.result, job.error = result, error
            job.done.set()
            detached = job.detached
        with self._lock:
            self._active.pop(job.key, None)
        if not detached:
            return
        if error is not None:
            logger.warning("Task %s failed after the request's budget: %s", job.key, error)
            return
        self._deliver(job, result)

    def _deliver(self, job: _Job, result: dict) -> None:
        if job.deliver is not None:
            try:
                job.deliver(result)
                return
            except Exception as exc:
                logger.error("Task %s: the prediction could not be delivered (%s); kept for the next request", job.key, exc)
        with self._lock:
            self._undelivered[job.key] = result
            while len(self._undelivered) > KEEP_UNDELIVERED:
                self._undelivered.popitem(last=False)

    def shutdown(self) -> None:
        """Stop taking work; running jobs finish."""
        self._executor.shutdown(wait=False, cancel_futures=True)
