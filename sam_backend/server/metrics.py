"""Prometheus metrics of the backend, for one process or for all of gunicorn's workers.

Without ``PROMETHEUS_MULTIPROC_DIR`` each app has its own registry (so tests
that build many apps stay independent) and ``/metrics`` shows its process.

Under ``sam-backend serve`` (or gunicorn with :mod:`sam_backend.gunicorn_conf`)
the master sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory before the
workers start, so prometheus-client keeps every worker's values in files
there, and ``/metrics``, whichever worker answers, reads them all
(:class:`~prometheus_client.multiprocess.MultiProcessCollector`): counters and
histograms are summed over workers, gauges say how they combine
(``multiprocess_mode``). Values that exist only when read (the encode queue's
length, the model's state) are copied into such gauges every
:data:`REFRESH_SECONDS` by each worker, so that another worker's scrape sees
them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

logger = logging.getLogger(__name__)

#: Seconds between two copies of a worker's read-time values into the shared files (multiprocess mode).
REFRESH_SECONDS = 1.0


def multiprocess_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` when prometheus-client runs in multiprocess mode, else None.

    prometheus-client picks its value class when first imported; a directory
    set after that is not used by the metrics, so it is ignored with a warning.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
    if not directory:
        return None
    from prometheus_client import values

    if values.ValueClass is values.MutexValue:
        logger.warning("PROMETHEUS_MULTIPROC_DIR was set after prometheus-client was imported; "
                       "/metrics shows this worker only.")
        return None
    return directory


@dataclass
class Metrics:
    """The counters and histograms ``/metrics`` exposes.

    Example:
        >>> metrics = Metrics.create()
        >>> metrics.requests.labels("predict").inc()
        >>> b'sam_requests_total{endpoint="predict"} 1.0' in metrics.expose()
        True
    """

    registry: CollectorRegistry
    requests: Counter
    errors: Counter
    predict_seconds: Histogram
    model_loaded: Gauge
    model_load_seconds: Gauge
    #: The directory of multiprocess mode, or None (this process only).
    multiprocess: str | None = None
    _updates: list[Callable[[], None]] = field(default_factory=list)
    _sources: list[Callable[[], Iterable]] = field(default_factory=list)
    _mirrors: dict = field(default_factory=dict)
    _refresher: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls) -> "Metrics":
        directory = multiprocess_dir()
        # The metric objects' own registry; in multiprocess mode /metrics reads the files instead.
        own = CollectorRegistry()
        if directory:
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=directory)
        else:
            registry = own
        return cls(
            registry=registry,
            requests=Counter("sam_requests", "HTTP requests by endpoint", ["endpoint"], registry=own),
            errors=Counter("sam_errors", "Error answers by endpoint and status", ["endpoint", "status"], registry=own),
            predict_seconds=Histogram(
                "sam_predict_seconds",
                "Time to answer /predict",
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 100),
                registry=own,
            ),
            # Over workers: 1 once every live worker is ready; the slowest load.
            model_loaded=Gauge("sam_model_loaded", "1 when the model is ready", registry=own,
                               multiprocess_mode="livemin"),
            model_load_seconds=Gauge("sam_model_load_seconds", "Seconds the model took to load", registry=own,
                                     multiprocess_mode="livemax"),
            multiprocess=directory,
        )

    def watch(self, sources: Callable[[], Iterable]) -> None:
        """Expose the metrics of objects that load after the app starts (engine, embedding tiers).

        ``sources`` is called at each scrape and returns the objects whose
        ``collect()`` to read (none while the model loads). In multiprocess
        mode their counters, histograms and gauges are in the shared files
        already; what they compute when read is copied there (see the module).
        """
        self._sources.append(sources)
        self.registry.register(_LateCollector(sources, local_only=bool(self.multiprocess)))
        self._start_refresher()

    def on_refresh(self, update: Callable[[], None]) -> None:
        """Call ``update`` (which sets gauges) before each scrape, and every second in multiprocess mode."""
        self._updates.append(update)
        self._start_refresher()

    def refresh(self) -> None:
        """Bring read-time values up to date (before a scrape; periodically in multiprocess mode)."""
        for update in self._updates:
            update()
        if self.multiprocess:
            self._mirror()

    def expose(self) -> bytes:
        """The text ``/metrics`` answers."""
        self.refresh()
        return generate_latest(self.registry)

    def _mirror(self) -> None:
        """Copy the gauges that sources compute when read into multiprocess gauges, summed over workers."""
        with self._lock:
            for sources in self._sources:
                for source in sources():
                    for family in source.collect():
                        if isinstance(family, GaugeMetricFamily):
                            self._mirror_family(family)

    def _mirror_family(self, family: GaugeMetricFamily) -> None:
        gauge, names, seen = self._mirrors.get(family.name, (None, (), set()))
        if gauge is None:
            if not family.samples:
                return  # nothing to copy yet; its label names come with its first sample
            names = tuple(family.samples[0].labels)
            gauge = Gauge(family.name, family.documentation, names, registry=None, multiprocess_mode="livesum")
        now = set()
        for sample in family.samples:
            labels = tuple(str(sample.labels.get(name, "")) for name in names)
            (gauge.labels(*labels) if names else gauge).set(sample.value)
            now.add(labels)
        for gone in seen - now:  # a series this worker no longer has counts 0, not its last value
            (gauge.labels(*gone) if names else gauge).set(0)
        self._mirrors[family.name] = (gauge, names, now | seen)

    def _start_refresher(self) -> None:
        if not self.multiprocess or self._refresher is not None:
            return
        self._refresher = threading.Thread(target=self._refresh_forever, name="sam-metrics", daemon=True)
        self._refresher.start()

    def _refresh_forever(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # metrics must never take a worker down
                logger.exception("Refreshing the metrics failed")
            time.sleep(REFRESH_SECONDS)


class _LateCollector:
    """A registry collector that reads the metrics of objects created after the registry.

    With ``local_only`` (multiprocess mode) it yields only what exists in this
    process alone: read-time families other than gauges (gauges are mirrored).
    """

    def __init__(self, sources: Callable[[], Iterable], local_only: bool = False):
        self._sources = sources
        self._local_only = local_only

    def collect(self):
        for source in self._sources():
            for family in source.collect():
                # Counter, Gauge and Histogram objects collect as plain Metric: their values are in the files.
                if self._local_only and (type(family) is Metric or isinstance(family, GaugeMetricFamily)):
                    continue
                yield family
