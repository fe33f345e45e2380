"""Prometheus metrics of the backend (one registry per app, so tests stay independent)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    def watch(self, sources: Callable[[], Iterable]) -> None:
        """Expose the metrics of objects that load after the app starts (engine, embedding tiers).

        ``sources`` is called at each scrape and returns the objects whose
        ``collect()`` to read (none while the model loads).
        """
        self.registry.register(_LateCollector(sources))


class _LateCollector:
    """A registry collector that reads the metrics of objects created after the registry."""

    def __init__(self, sources: Callable[[], Iterable]):
        self._sources = sources

    def collect(self):
        for source in self._sources():
            yield from source.collect()
