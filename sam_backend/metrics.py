"""Prometheus metrics of the backend (one registry per app, so tests stay independent)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class Metrics:
    """The counters and histograms ``/metrics`` exposes."""

    registry: CollectorRegistry
    requests: Counter
    errors: Counter
    predict_seconds: Histogram
    model_loaded: Gauge

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
        )
