"""Prometheus metrics of the backend (one registry per app, so tests stay independent)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Buckets of the encode histogram: a GPU encodes in tens of milliseconds, a
#: CPU in seconds to a minute (ViT-H).
ENCODE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
#: Buckets of the decode histogram: milliseconds on a GPU, tenths of a second on a CPU.
DECODE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


@dataclass
class Metrics:
    """The counters and histograms ``/metrics`` exposes."""

    registry: CollectorRegistry
    requests: Counter
    errors: Counter
    predict_seconds: Histogram
    model_loaded: Gauge
    model_load_seconds: Gauge

    @classmethod
    def create(cls) -> "Metrics":
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter("sam_requests", "HTTP requests by endpoint", ["endpoint"], registry=registry),
            errors=Counter("sam_errors", "Error answers by endpoint and status", ["endpoint", "status"], registry=registry),
            predict_seconds=Histogram(
                "sam_predict_seconds",
                "Time to answer /predict",
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 100),
                registry=registry,
            ),
            model_loaded=Gauge("sam_model_loaded", "1 when the model is ready", registry=registry),
            model_load_seconds=Gauge("sam_model_load_seconds", "Seconds the model took to load", registry=registry),
        )

    def watch(self, stats: Callable[[], "EngineStats | None"]) -> None:
        """Expose the engine's statistics, read at each scrape (the engine loads after the app starts)."""
        self.registry.register(_EngineCollector(stats))


class EngineStats:
    """What one :class:`~sam_backend.engine.SamEngine` counts and times.

    The metrics belong to no registry: the engine exists without a server
    (tests, ``precompute``), and an app exposes them through
    :meth:`Metrics.watch` once its engine has loaded.

    Example:
        >>> stats = EngineStats()
        >>> stats.lookup("disk", hit=True)
        >>> stats.lookups.labels("disk", "hit")._value.get()
        1.0
    """

    def __init__(self):
        self.lookups = Counter(
            "sam_embedding_lookups", "Embedding lookups by cache tier (memory, disk, redis) and result (hit, miss)",
            ["tier", "result"], registry=None,
        )
        self.encode_seconds = Histogram(
            "sam_encode_seconds", "Image encoder time per image", buckets=ENCODE_BUCKETS, registry=None
        )
        self.decode_seconds = Histogram(
            "sam_decode_seconds", "Prompt encoder and mask decoder time per prompt", buckets=DECODE_BUCKETS,
            registry=None,
        )
        self.in_flight = Gauge("sam_images_in_flight", "Images being encoded now", registry=None)

    def lookup(self, tier: str, hit: bool) -> None:
        """Count one lookup in ``tier``."""
        self.lookups.labels(tier, "hit" if hit else "miss").inc()

    def collect(self):
        for metric in (self.lookups, self.encode_seconds, self.decode_seconds, self.in_flight):
            yield from metric.collect()


class _EngineCollector:
    """A registry collector that reads the current engine's :class:`EngineStats`."""

    def __init__(self, stats: Callable[[], EngineStats | None]):
        self._stats = stats

    def collect(self):
        stats = self._stats()
        if stats is not None:
            yield from stats.collect()
