"""Embeddings by image, from the cheapest tier that has them: memory, then the store, then the encoder.

The server and the commands ask :class:`EmbeddingTiers` for an image's
embedding; it looks in this process's memory LRU, then in the persistent
store shared by workers and hosts, and encodes only when both miss, once per
image across threads (the encode queue's single flight) and workers (the
store's lock).

Encodes go through the process's :class:`~sam_backend.embeddings.encode_queue.EncodeQueue`:
one at a time on a CPU, batched on a GPU, clicks first. Lookups that hit
memory or the store never touch the queue, so a click on an encoded image
never waits for another image's encode.

Lock order: the store's lock (across workers) is taken by the queue's worker
when the image's turn comes (:class:`_TierJob`), and held for that image's
look-again, encode and write only, never while it waits in the queue behind
other images: a worker of another process asked for the same image waits for
one encode, not for this process's queue (and a postponed warm-up never holds
it). A batch takes its images' locks in key order, so workers of two
processes never hold one lock each while waiting for the other's. The price:
while the worker waits for a lock, another process is encoding that image
(one encode at most, then this one reads its entry) and this process's other
queued images wait too; a Redis lock whose holder died holds them until it
expires (``LOCK_TIMEOUT_SECONDS``). Cached lookups are never held up by it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import Callable, Hashable

import numpy as np
from prometheus_client import Counter

from sam_backend.embeddings.encode_queue import EncodeJob, EncodeQueue, Priority
from sam_backend.embeddings.fingerprints import fingerprint_model, fingerprint_preset_dir
from sam_backend.embeddings.memory import DEFAULT_BUDGET_BYTES, LRUCache
from sam_backend.embeddings.store import EmbeddingStore, StoredEmbedding, entry_key
from sam_backend.errors import StoreError
from sam_backend.sam.engine import Embedding, Prediction, SamEngine, device_scope
from sam_backend.sam.images import ImageSource
from sam_backend.sam.transforms import Frame

logger = logging.getLogger(__name__)

#: An image, or a callable that loads it only when no tier has its embedding.
LazyImage = ImageSource | Callable[[], ImageSource]


#: How an encoder precision other than float32 marks the fingerprint.
_PRECISION_TAGS = {"bfloat16": "bf16", "float16": "fp16"}


class EmbeddingTiers:
    """The embeddings of an engine's images, kept in memory and in a store.

    Args:
        engine: the :class:`~sam_backend.sam.engine.SamEngine` that encodes misses.
        store: a persistent :class:`~sam_backend.embeddings.store.EmbeddingStore`
            behind the memory cache (shared by workers, kept across restarts), or None.
        cache_bytes: budget of the in-memory cache; default ``SAM_MEMORY_CACHE_MB``, else 512 MB.
        fingerprint: the preset's identity in store keys; default a hash of the
            preset directory's files, else of the model's config and weights
            (computed once, when a store is given).
        encode_queue: the :class:`~sam_backend.embeddings.encode_queue.EncodeQueue`
            that runs the encodes; default one of its own for ``engine``.

    Example:
        >>> tiers = EmbeddingTiers(SamEngine.from_preset("demo"), store=open_store())  # doctest: +SKIP
        >>> embedding = tiers.embedding_for(image_identity(url, path), lambda: load_image(path))  # doctest: +SKIP
        >>> tiers.engine.decode(embedding, points=[[40, 30]], labels=[1]).score  # doctest: +SKIP
        0.93
    """

    def __init__(
        self,
        engine: SamEngine,
        store: EmbeddingStore | None = None,
        cache_bytes: int | None = None,
        fingerprint: str | None = None,
        encode_queue: EncodeQueue | None = None,
    ):
        self.engine = engine
        self.store = store
        self.queue = encode_queue if encode_queue is not None else EncodeQueue(engine)
        if cache_bytes is None:
            mb = os.environ.get("SAM_MEMORY_CACHE_MB")
            cache_bytes = int(float(mb) * 1024 * 1024) if mb else DEFAULT_BUDGET_BYTES
        self.memory: LRUCache[Embedding] = LRUCache(cache_bytes, lambda e: e.nbytes)
        self.lookups = Counter(
            "sam_embedding_lookups", "Embedding lookups by cache tier (memory, disk, redis) and result (hit, miss)",
            ["tier", "result"], registry=None,
        )
        self._fingerprint = fingerprint
        self._fingerprint_lock = threading.Lock()
        if store is not None:
            self.fingerprint  # noqa: B018  (hash the weights at load, not on the first click)

    @property
    def fingerprint(self) -> str:
        """The preset's identity in store keys: a hash of its config and weights, and the encoder's precision.

        Embeddings from a reduced-precision encoder (bfloat16 on a CPU with
        AMX, see ``sam_backend.accel.precision``) are keyed apart from float32
        ones, so that switching ``SAM_PRECISION`` never serves the other's.
        """
        with self._fingerprint_lock:
            if self._fingerprint is None:
                started = time.perf_counter()
                self._fingerprint = self._compute_fingerprint()
                logger.info("Fingerprinted %s in %.1fs: %s", self.engine.preset, time.perf_counter() - started,
                            self._fingerprint[:16])
            tag = _PRECISION_TAGS.get(getattr(self.engine, "precision", "float32"), "")
            # A prefix: store keys keep only the first 32 characters of a fingerprint.
            return f"{tag}-{self._fingerprint}" if tag else self._fingerprint

    def _compute_fingerprint(self) -> str:
        if self.engine.preset_dir:
            try:  # hashing the files is cheaper than hashing the loaded weights
                return fingerprint_preset_dir(self.engine.preset_dir)
            except (OSError, ValueError) as exc:
                logger.info("Fingerprinting the loaded model instead of %s: %s", self.engine.preset_dir, exc)
        return fingerprint_model(self.engine.model)

    def lookup(self, tier: str, hit: bool) -> None:
        """Count one lookup in ``tier``."""
        self.lookups.labels(tier, "hit" if hit else "miss").inc()

    def collect(self):
        """The lookup counts and the encode queue's metrics, for a registry collector."""
        yield from self.lookups.collect()
        yield from self.queue.collect()

    @property
    def _store_tier(self) -> str:
        return getattr(self.store, "tier", "store")

    # ------------------------------------------------------------- lookups

    def embedding_for(self, key: Hashable, image: LazyImage, priority: Priority = Priority.CLICK) -> Embedding:
        """The embedding of the image identified by ``key``, encoded at most once.

        Looks in the memory cache, then in the store (if any), and encodes
        only when both miss, through the encode queue at ``priority``
        (:class:`~sam_backend.embeddings.encode_queue.Priority`: a warm-up or
        pre-labelling waits behind clicks, and a stale warm-up raises
        :class:`~sam_backend.embeddings.encode_queue.EncodeSkipped`); threads of
        a process (the queue) and workers sharing a store (its lock) asking for
        the same new image encode it once. ``image`` may be a callable that
        loads the image, so that a cached image is not even read. With a
        store, ``key`` must be a string that identifies the image's content
        (:func:`~sam_backend.embeddings.fingerprints.image_identity`).
        """
        embedding = self.memory.get(key)
        self.lookup("memory", hit=embedding is not None)
        if embedding is not None:
            if self.store is not None:
                self._touch_store(str(key))
            return embedding
        if self.store is not None:
            embedding = self._stored(str(key))
            if embedding is not None:
                self.memory.put(key, embedding)
                return embedding
        return self._encoded([(key, image)], priority)[0]

    def embeddings_for_many(self, items: list[tuple[Hashable, LazyImage]],
                            priority: Priority = Priority.CLICK) -> list[Embedding]:
        """:meth:`embedding_for` for several images, encoding those no tier has in one encoder call.

        Results are in the order of ``items``.
        """
        results: list[Embedding | None] = [self.memory.get(key) for key, _ in items]
        for index, (key, _) in enumerate(items):
            self.lookup("memory", hit=results[index] is not None)
            if results[index] is None and self.store is not None:
                results[index] = self._stored(str(key))
                if results[index] is not None:
                    self.memory.put(key, results[index])
        missing = [i for i, result in enumerate(results) if result is None]
        if missing:
            for i, embedding in zip(missing, self._encoded([items[i] for i in missing], priority, together=True)):
                results[i] = embedding
        return results

    def ensure_stored(self, key: str, image: LazyImage) -> bool:
        """Put the embedding of ``key`` into the store unless it is there; True if encoded now.

        For precomputing: the memory cache is left alone, and a stored entry
        is checked but not loaded onto the device.

        Raises:
            StoreError: there is no store, or the entry cannot be written.
        """
        if self.store is None:
            raise StoreError("There is no embedding store to fill.")
        if self._read_store(entry_key(self.fingerprint, key)) is not None:
            return False
        job = _TierJob(self, key, image, keep=False)
        # Its own queue key: a caller of embedding_for must never get this job's "already stored".
        self.queue.submit(("ensure_stored", key), job, Priority.BACKGROUND).result()
        return job.encoded

    def look_ahead(self, key: str, image: LazyImage, protect_seconds: float) -> Future:
        """Encode the image of ``key`` for a click that may come, after every other encode.

        Nothing happens when memory or the store has it, or when another
        worker holds its lock (it is encoding it). Otherwise it is encoded
        at :attr:`Priority.LOOKAHEAD` and kept as a spare (into the store,
        else memory): only if that evicts nothing used in the last
        ``protect_seconds``, and ranked to be evicted before anything used
        since. A click that asks for the image while it waits takes the job
        over at its own priority, and keeps the result as usual.

        Returns:
            A future of ``"present"``, ``"busy"``, ``"encoded"``, ``"no room"``
            (encoded, not kept) or ``"taken over"`` (a click joined it: encoded
            for the click, not ahead of it); :meth:`EncodeQueue.discard` ends
            it with :class:`~sam_backend.embeddings.encode_queue.EncodeSkipped`.
        """
        if key in self.memory:
            done: Future = Future()
            done.set_result("present")
            return done
        job = _LookAheadJob(self, key, image, protect_seconds)
        future = self.queue.submit(key, job, Priority.LOOKAHEAD)
        outcome: Future = Future()

        def settle(done: Future) -> None:
            error = done.exception()
            if error is not None:
                outcome.set_exception(error)
            else:
                outcome.set_result(job.outcome or "present")  # another job's result: someone else's encode

        future.add_done_callback(settle)
        return outcome

    def predict(self, image: LazyImage, key: Hashable, **prompt) -> Prediction:
        """``engine.decode(embedding_for(key, image), **prompt)``: the whole path for one click."""
        return self.engine.decode(self.embedding_for(key, image), **prompt)

    # --------------------------------------------------------------- tiers

    def _encoded(self, items: list[tuple[Hashable, LazyImage]], priority: Priority,
                 together: bool = False) -> list[Embedding]:
        """Encode ``items`` through the queue (in one encoder call if ``together``) and wait for them."""
        jobs = []
        for key, image in items:
            if callable(image) and key not in self.queue:
                image = image()  # decoded in this thread, while the worker encodes other images
            jobs.append((key, _TierJob(self, key, image)))
        if together:
            futures = self.queue.submit_group(jobs, priority)
        else:
            futures = [self.queue.submit(key, job, priority) for key, job in jobs]
        results = [future.result() for future in futures]
        for index, result in enumerate(results):
            if result is _NOT_ENCODED:
                # A look-ahead decided to do nothing just as this caller joined it: look again.
                results[index] = self.embedding_for(*items[index], priority=priority)
        return results

    def _touch_store(self, key: str) -> None:
        """Tell the store that its entry is in use, so that its LRU does not evict an image served from memory."""
        try:
            self.store.touch(entry_key(self.fingerprint, key))
        except Exception as exc:
            logger.debug("Embedding store %s failed to touch %s: %s", self.store.location, key, exc)

    def _stored(self, key: str) -> Embedding | None:
        """The stored embedding of ``key`` on the device, or None.

        A miss is counted by the encode's job, which looks again under the store's lock.
        """
        embedding = self._load_stored(entry_key(self.fingerprint, key))
        if embedding is not None:
            self.lookup(self._store_tier, hit=True)
            logger.info("Loaded the embedding of %s from %s", key, self.store.location)
        return embedding

    def _read_store(self, store_key: str) -> StoredEmbedding | None:
        """The stored entry if it fits this model; a misfit is dropped. Store failures count as misses."""
        try:
            entry = self.store.get(store_key)
        except Exception as exc:  # a store failure must cost an encode, never the request
            logger.warning("Embedding store %s failed to read (%s: %s); encoding instead.",
                           self.store.location, type(exc).__name__, exc)
            return None
        if entry is None:
            return None
        engine = self.engine
        expected = (*engine.embedding_size, engine.embedding_channels)
        frame = Frame.for_image(entry.original_size, engine.input_size)
        if entry.features.shape != expected or entry.input_size != engine.input_size or frame.resized_size != entry.resized_size:
            logger.warning("Dropping the stored embedding %s: features %s for input %d do not fit this model (%s, %d).",
                           store_key, entry.features.shape, entry.input_size, expected, engine.input_size)
            self._discard_store(store_key)
            return None
        return entry

    def _load_stored(self, store_key: str) -> Embedding | None:
        entry = self._read_store(store_key)
        if entry is None:
            return None
        from keras import ops

        with device_scope(self.engine.device):
            features = ops.convert_to_tensor(entry.features.astype(np.float32)[None])
        return Embedding(features=features, frame=Frame.for_image(entry.original_size, self.engine.input_size))

    @staticmethod
    def _to_stored(embedding: Embedding) -> StoredEmbedding:
        import torch

        features = embedding.features[0].detach().to(torch.float16).cpu().numpy()
        frame = embedding.frame
        return StoredEmbedding(features, tuple(frame.original_size), tuple(frame.resized_size), frame.input_size)

    def _write_store(self, store_key: str, embedding: Embedding) -> None:
        """Store ``embedding`` and keep only what the store keeps (float16) in it too.

        So a click gives the same mask whichever tier serves the embedding.
        """
        embedding.features = embedding.features.half().float()
        try:
            self.store.put(store_key, self._to_stored(embedding))
        except Exception as exc:
            logger.warning("Embedding store %s failed to write (%s: %s); serving from memory.",
                           self.store.location, type(exc).__name__, exc)

    def _discard_store(self, store_key: str) -> None:
        try:
            self.store.discard(store_key)
        except Exception as exc:
            logger.warning("Embedding store %s failed to delete %s (%s)", self.store.location, store_key, exc)


#: What an ``ensure_stored`` job gives when the store has the entry by its turn.
_ALREADY_STORED = object()
#: What a look-ahead job gives when it encodes nothing (see :attr:`_LookAheadJob.outcome`).
_NOT_ENCODED = object()


class _TierJob(EncodeJob):
    """An encode that the tiers wrap: looked for again when its turn comes, then stored and kept in memory.

    The queue's worker calls :meth:`prepare` when the image's turn comes, so
    the store's lock is held for this image's look-again, encode and write
    only, never while it waits behind other images (see the module's "Lock order").

    Args:
        tiers: the tiers the embedding goes into.
        key: the image's identity.
        image: the image, or a callable that loads it.
        keep: keep the embedding in memory (False for ``ensure_stored``, which
            also checks a stored entry without loading it, and raises
            :class:`StoreError` when the entry cannot be written).

    Example:
        >>> job = _TierJob(tiers, "img-1", image)  # doctest: +SKIP
        >>> tiers.queue.submit("img-1", job).result() is tiers.memory.get("img-1")  # doctest: +SKIP
        True
    """

    def __init__(self, tiers: EmbeddingTiers, key: Hashable, image: LazyImage, keep: bool = True):
        self.tiers = tiers
        self.key = key
        self.keep = keep
        self.store_key = entry_key(tiers.fingerprint, str(key)) if tiers.store is not None else None
        super().__init__(image, order=self.store_key or str(key))
        self.encoded = False
        self._locks = contextlib.ExitStack()

    def prepare(self) -> object | None:
        tiers = self.tiers
        if self.keep:
            # Encoded by an earlier job after the caller looked (e.g. a no-store process's race).
            found = tiers.memory.get(self.key)
            if found is not None:
                return found
        if tiers.store is None:
            return None
        self._locks.enter_context(tiers.store.lock(self.store_key))
        # Another worker may have stored it while this job waited in the queue or for the lock.
        if not self.keep:
            return _ALREADY_STORED if tiers._read_store(self.store_key) is not None else None
        found = tiers._load_stored(self.store_key)
        tiers.lookup(tiers._store_tier, hit=found is not None)
        if found is not None:
            logger.info("Loaded the embedding of %s from %s", self.key, tiers.store.location)
            tiers.memory.put(self.key, found)
        return found

    def finish(self, embedding: Embedding) -> Embedding:
        tiers = self.tiers
        self.encoded = True
        if self.store_key is not None:
            if self.keep:
                tiers._write_store(self.store_key, embedding)
            elif not tiers.store.put(self.store_key, tiers._to_stored(embedding)):
                raise StoreError(
                    f"Could not write the embedding of {self.key} to {tiers.store.location}; see the log."
                )
        if self.keep:
            tiers.memory.put(self.key, embedding)
        return embedding

    def release(self) -> None:
        self._locks.close()


class _LookAheadJob(_TierJob):
    """A look-ahead encode (:meth:`EmbeddingTiers.look_ahead`): a spare unless a caller joins it.

    While nobody but the look-ahead waits for it, :meth:`prepare` gives up at
    once when the image is already in memory or the store, or when another
    worker holds its lock, and :meth:`finish` keeps the embedding only where
    that evicts nothing recently used. Once a more urgent caller joins
    (:meth:`escalate`), it is an ordinary :class:`_TierJob`.
    """

    def __init__(self, tiers: EmbeddingTiers, key: str, image: LazyImage, protect_seconds: float):
        super().__init__(tiers, key, image)
        self.protect_seconds = protect_seconds
        self.spare = True
        #: ``present``, ``busy``, ``encoded``, ``no room`` or ``taken over``, once the job has run.
        self.outcome: str | None = None

    def escalate(self, priority: Priority) -> None:
        self.spare = False

    def prepare(self) -> object | None:
        if not self.spare:
            return super().prepare()
        tiers = self.tiers
        if self.key in tiers.memory:
            self.outcome = "present"
            return _NOT_ENCODED
        if tiers.store is None:
            return None
        # Never wait for another worker: whoever holds the lock is encoding this image.
        if not self._locks.enter_context(tiers.store.lock(self.store_key, timeout=0)):
            self.outcome = "busy"
            return _NOT_ENCODED
        if tiers._read_store(self.store_key) is not None:
            self.outcome = "present"
            return _NOT_ENCODED
        return None

    def finish(self, embedding: Embedding) -> Embedding:
        if not self.spare:
            self.outcome = "taken over"
            return super().finish(embedding)
        tiers = self.tiers
        self.encoded = True
        if tiers.store is not None:
            kept = tiers.store.put_spare(self.store_key, tiers._to_stored(embedding), self.protect_seconds)
        else:
            kept = tiers.memory.put_spare(self.key, embedding, self.protect_seconds)
        self.outcome = "encoded" if kept else "no room"
        return embedding
