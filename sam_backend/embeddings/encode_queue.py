"""One image encoder, many callers: a process's encodes wait in a queue and run one encoder call at a time.

On a CPU a single encode already keeps every core busy (torch's intra-op
threads), so eight request threads encoding eight images at once only make
each encode eight times slower, and they take the cores from clicks on images
that are already encoded. :class:`EncodeQueue` runs a process's encodes on
one worker thread instead: clicks before warm-ups before background work,
each image once however many callers ask for it, and on a GPU several queued
images in one encoder call. Lookups that hit memory or a store never come here
(:class:`~sam_backend.embeddings.tiers.EmbeddingTiers` looks there first).

The queue knows nothing of storage: what happens around an image's encode
(looking again in a store under its lock, writing the result) are the hooks of
its :class:`EncodeJob`, which the worker calls when the image's turn comes.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Callable, Hashable, Iterable

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily

from sam_backend.errors import SamBackendError

if TYPE_CHECKING:
    from sam_backend.sam.engine import Embedding, SamEngine
    from sam_backend.sam.images import ImageSource

logger = logging.getLogger(__name__)

#: Images per encoder call on a GPU when ``SAM_ENCODE_BATCH`` is not set (a CPU takes one: a
#: batch costs it as much as the images one by one, and makes a click wait for all of them).
DEFAULT_GPU_BATCH = 4
#: Seconds a warm-up may wait behind clicks before it is dropped (``SAM_WARMUP_MAX_AGE``): by
#: then its annotator has clicked (the click encodes the image) or moved on.
DEFAULT_WARMUP_MAX_AGE = 30.0


class Priority(IntEnum):
    """Which queued encode runs first: the lowest value, then the oldest.

    Example:
        >>> Priority.CLICK < Priority.WARMUP < Priority.BACKGROUND < Priority.LOOKAHEAD
        True
    """

    #: An annotator clicked and waits for the mask.
    CLICK = 0
    #: A task was just opened: its first click will want the embedding. Dropped when stale.
    WARMUP = 1
    #: Pre-labelling and precomputing: nobody is waiting at a click.
    BACKGROUND = 2
    #: The tasks an annotator will open next (``sam_backend.server.lookahead``): a guess,
    #: so after everything else; taken back by :meth:`EncodeQueue.discard` when the guess is wrong.
    LOOKAHEAD = 3


class EncodeSkipped(SamBackendError):
    """A warm-up was dropped from the queue after waiting too long behind clicks; the first click encodes the image."""


class EncodeJob:
    """One image to encode and what to do around its encode.

    When the image's turn comes the worker calls ``prepare()``: a result found
    meanwhile (the job then ends without an encode) or None; then ``load()``,
    the encode, and ``finish(embedding)``, whose return value the callers get.
    ``release()`` follows every ``prepare()``, whatever happened. Subclasses
    override the hooks; this class just encodes ``image``.

    Args:
        image: the image, or a callable that loads it.
        order: within one batch, jobs are prepared in this order; where ``prepare``
            takes locks shared by processes, it must be the lock's name, so that
            two processes never hold one lock each while waiting for the other's.

    Example:
        >>> job = EncodeJob(lambda: np.zeros((32, 48, 3), np.uint8))  # doctest: +SKIP
        >>> queue.submit("img-1", job).result().frame.original_size  # doctest: +SKIP
        (32, 48)
    """

    def __init__(self, image: ImageSource | Callable[[], ImageSource], order: str = ""):
        self.image = image
        self.order = order

    def prepare(self) -> object | None:
        """Before the encode, in the worker: the result if it needs no encode any more, else None."""
        return None

    def load(self) -> ImageSource:
        """The image to encode."""
        return self.image() if callable(self.image) else self.image

    def finish(self, embedding: Embedding) -> object:
        """After the encode, in the worker: what the callers get."""
        return embedding

    def release(self) -> None:
        """After ``prepare`` and whatever followed it (e.g. release a lock ``prepare`` took)."""

    def escalate(self, priority: Priority) -> None:
        """A caller at ``priority``, more urgent than the job's own, now waits for it too."""


@dataclass(eq=False)
class _Item:
    key: Hashable
    job: EncodeJob
    future: Future = field(default_factory=Future)
    priority: int = int(Priority.CLICK)  # the most urgent caller's, started or not
    unit: _Unit | None = None
    result: object = None
    error: BaseException | None = None
    done: bool = False


@dataclass(eq=False)
class _Unit:
    """Images that leave the queue together: one submit, or one group (encoded in one call)."""

    items: list[_Item]
    priority: int
    seq: int
    queued_at: float
    grouped: bool
    droppable: bool  # only warm-ups asked for it


class EncodeQueue:
    """Runs an engine's encodes on one worker thread, in priority order, each image once.

    ``submit`` returns a future of the job's result. A key already queued or
    being encoded gets that job's future (and raises its priority if the new
    request's is higher: a click on the image of a queued warm-up takes the
    warm-up's place among the clicks). Warm-ups that waited longer than
    ``max_warmup_age`` behind clicks are dropped; their future raises
    :class:`EncodeSkipped`. On a GPU, up to ``batch_size`` queued images of
    the same priority go to the encoder in one call.

    Args:
        engine: the :class:`~sam_backend.sam.engine.SamEngine` that encodes.
        batch_size: images per encoder call; default ``SAM_ENCODE_BATCH``, else
            4 when the engine runs on CUDA and 1 otherwise.
        max_warmup_age: seconds; default ``SAM_WARMUP_MAX_AGE``, else 30.

    Example:
        >>> queue = EncodeQueue(SamEngine.from_preset("demo"))  # doctest: +SKIP
        >>> embedding = queue.submit("img-1", EncodeJob(image), Priority.CLICK).result()  # doctest: +SKIP
        >>> len(queue)  # doctest: +SKIP
        0
    """

    def __init__(self, engine: SamEngine, batch_size: int | None = None, max_warmup_age: float | None = None):
        self.engine = engine
        self._batch_size = batch_size if batch_size is not None else _env_number("SAM_ENCODE_BATCH", int)
        if self._batch_size is not None and self._batch_size < 1:
            raise ValueError(f"The encode batch size (SAM_ENCODE_BATCH) must be at least 1, not {self._batch_size}.")
        if max_warmup_age is None:
            max_warmup_age = _env_number("SAM_WARMUP_MAX_AGE", float)
        self.max_warmup_age = DEFAULT_WARMUP_MAX_AGE if max_warmup_age is None else max_warmup_age
        self.skipped = Counter("sam_encode_warmups_skipped", "Warm-up encodes dropped after waiting behind clicks",
                               registry=None)
        self._cond = threading.Condition()
        self._units: list[_Unit] = []
        self._items: dict[Hashable, _Item] = {}  # queued or being encoded, by key
        self._seq = itertools.count()
        self._worker: threading.Thread | None = None
        self._closed = False

    @property
    def batch_size(self) -> int:
        """Images per encoder call (asks the engine for its device the first time)."""
        if self._batch_size is None:
            try:
                on_gpu = str(self.engine.device_name).startswith("cuda")
            except Exception:  # an engine that cannot say runs one image at a time
                on_gpu = False
            self._batch_size = DEFAULT_GPU_BATCH if on_gpu else 1
            logger.info("Encoding up to %d image(s) per encoder call", self._batch_size)
        return self._batch_size

    def __bool__(self) -> bool:
        return True  # an empty queue is still a queue (``queue or default`` must keep it)

    def __len__(self) -> int:
        """Images waiting (not counting those being encoded)."""
        with self._cond:
            return sum(len(unit.items) for unit in self._units)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is queued or being encoded."""
        with self._cond:
            return key in self._items

    def submit(self, key: Hashable, job: EncodeJob, priority: Priority = Priority.CLICK) -> Future:
        """Queue ``job`` under ``key`` (or join the job already there); a future of its result."""
        return self._submit([(key, job)], priority, grouped=False)[0]

    def submit_group(self, jobs: list[tuple[Hashable, EncodeJob]], priority: Priority = Priority.CLICK) -> list[Future]:
        """Queue ``jobs`` to be encoded in one encoder call, whatever the batch size; their futures, in order.

        Keys already queued keep their own job (and are not part of the call).
        """
        return self._submit(jobs, priority, grouped=True)

    def _submit(self, jobs: list[tuple[Hashable, EncodeJob]], priority: Priority, grouped: bool) -> list[Future]:
        futures, fresh = [], []
        with self._cond:
            if self._closed:
                raise RuntimeError("The encode queue is closed.")
            for key, job in jobs:
                item = self._items.get(key)
                if item is None:
                    item = self._items[key] = _Item(key, job)
                    fresh.append(item)
                else:
                    if item.unit is not None:
                        # A click on the image of a queued warm-up takes its place among the clicks;
                        # an image that anyone but a warm-up waits for is never dropped.
                        item.unit.priority = min(item.unit.priority, int(priority))
                        item.unit.droppable = item.unit.droppable and priority == Priority.WARMUP
                    if priority < item.priority:
                        item.priority = int(priority)
                        item.job.escalate(priority)
                futures.append(item.future)
            now = time.monotonic()
            for item in fresh:
                item.priority = int(priority)
            for members in ([fresh] if grouped else [[item] for item in fresh]) if fresh else []:
                unit = _Unit(members, int(priority), next(self._seq), now, grouped, priority == Priority.WARMUP)
                for item in members:
                    item.unit = unit
                self._units.append(unit)
            dropped = self._drop_stale()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="sam-encoder", daemon=True)
                self._worker.start()
            self._cond.notify()
        self._skip(dropped)
        return futures

    def discard(self, keys: Iterable[Hashable]) -> int:
        """Take the look-ahead encodes of ``keys`` out of the queue, unless they have started; how many.

        Only units queued at :attr:`Priority.LOOKAHEAD` that nobody else has
        joined since go (a click on the same image made its unit a click's);
        their futures raise :class:`EncodeSkipped`.
        """
        keys = set(keys)
        with self._cond:
            gone = [unit for unit in self._units if unit.priority == Priority.LOOKAHEAD
                    and all(item.key in keys for item in unit.items)]
            for unit in gone:
                self._units.remove(unit)
                for item in unit.items:
                    self._items.pop(item.key, None)
        for unit in gone:
            for item in unit.items:
                item.future.set_exception(EncodeSkipped("the annotator moved elsewhere; the look-ahead was dropped"))
        return sum(len(unit.items) for unit in gone)

    def close(self) -> None:
        """Stop after the encode in progress; what is still queued fails."""
        with self._cond:
            self._closed = True
            units, self._units = self._units, []
            for unit in units:
                for item in unit.items:
                    self._items.pop(item.key, None)
            self._cond.notify_all()
        for unit in units:
            for item in unit.items:
                item.future.set_exception(RuntimeError("The encode queue was closed before this image's turn."))

    def collect(self):
        """The queue's metrics, for a registry collector."""
        gauge = GaugeMetricFamily("sam_encode_queue_length", "Images waiting for the encoder, by priority",
                                  labels=["priority"])
        with self._cond:
            counts = {priority: 0 for priority in Priority}
            for unit in self._units:
                counts[Priority(unit.priority)] += len(unit.items)
        for priority, count in counts.items():
            gauge.add_metric([priority.name.lower()], count)
        yield gauge
        yield from self.skipped.collect()

    # ---------------------------------------------------------------- worker

    def _drop_stale(self) -> list[_Unit]:
        """Take warm-ups that waited too long out of the queue (the caller holds the lock)."""
        now = time.monotonic()
        stale = [u for u in self._units if u.droppable and now - u.queued_at > self.max_warmup_age]
        for unit in stale:
            self._units.remove(unit)
            for item in unit.items:
                self._items.pop(item.key, None)
        return stale

    def _skip(self, units: list[_Unit]) -> None:
        for unit in units:
            waited = time.monotonic() - unit.queued_at
            for item in unit.items:
                self.skipped.inc()
                logger.info("Dropped the warm-up encode of %s after %.0fs behind clicks", item.key, waited)
                item.future.set_exception(EncodeSkipped(
                    f"the encoder was busy with clicks for {waited:.0f}s (more than SAM_WARMUP_MAX_AGE, "
                    f"{self.max_warmup_age:g}s); the first click encodes the image"
                ))

    def _work(self) -> None:
        while True:
            units = self._take()
            if units is None:
                return
            self._run(units)

    def _take(self) -> list[_Unit] | None:
        """The next units to encode: the most urgent one, and on a GPU more of its priority."""
        batch_size = self.batch_size
        with self._cond:
            while True:
                dropped = self._drop_stale()
                if dropped or self._units or self._closed:
                    break
                self._cond.wait()
            if dropped:
                taken = []
            elif self._closed:
                return None
            else:
                first = min(self._units, key=lambda u: (u.priority, u.seq))
                taken, images = [first], len(first.items)
                if not first.grouped:
                    for unit in sorted(self._units, key=lambda u: u.seq):
                        if images >= batch_size:
                            break
                        if unit is not first and not unit.grouped and unit.priority == first.priority:
                            taken.append(unit)
                            images += len(unit.items)
                for unit in taken:
                    self._units.remove(unit)
        self._skip(dropped)
        return taken

    def _run(self, units: list[_Unit]) -> None:
        """Prepare, load, encode and finish the units' jobs; every future is resolved, whatever fails."""
        items = sorted((item for unit in units for item in unit.items), key=lambda item: item.job.order)
        prepared, todo = [], []
        started = time.monotonic()
        try:
            for item in items:
                prepared.append(item)
                try:
                    found = item.job.prepare()
                    if found is not None:
                        item.result, item.done = found, True
                    else:
                        todo.append((item, item.job.load()))
                except BaseException as exc:  # this image's failure (unreadable, a store error), not the others'
                    item.error = exc
            if todo:
                self._encode(todo, started)
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            logger.exception("The encode queue failed")
            for item in items:
                if not item.done and item.error is None:
                    item.error = exc
        finally:
            for item in prepared:
                try:
                    item.job.release()
                except Exception:
                    logger.exception("Releasing the encode of %s failed", item.key)
            with self._cond:
                for item in items:
                    if self._items.get(item.key) is item:
                        del self._items[item.key]
            for item in items:
                if item.error is not None:
                    item.future.set_exception(item.error)
                elif item.done:
                    item.future.set_result(item.result)
                else:
                    item.future.set_exception(RuntimeError(f"The encode of {item.key} ended without a result."))

    def _encode(self, todo: list[tuple[_Item, ImageSource]], started: float) -> None:
        images = [image for _, image in todo]
        queued = min(item.unit.queued_at for item, _ in todo)
        try:
            begun = time.monotonic()
            if len(images) == 1:
                embeddings = [self.engine.encode(images[0])]
            else:
                embeddings = self.engine.encode_many(images)
        except BaseException as exc:  # every image of the call gets the encoder's error
            for item, _ in todo:
                item.error = exc
            return
        logger.info("Encoded %s in %.2fs (queued %.2fs before)", ", ".join(str(item.key) for item, _ in todo),
                    time.monotonic() - begun, started - queued)
        for (item, _), embedding in zip(todo, embeddings):
            try:
                item.result, item.done = item.job.finish(embedding), True
            except BaseException as exc:
                item.error = exc


def _env_number(name: str, kind: type):
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {value!r}.") from None
