"""What an engine counts and times, as Prometheus metrics that belong to no registry yet.

The engine exists without a server (tests, the commands); the server exposes
these through :meth:`sam_backend.server.metrics.Metrics.watch` once the
engine has loaded.
"""

from __future__ import annotations

from prometheus_client import Gauge, Histogram

#: Buckets of the encode histogram: a GPU encodes in tens of milliseconds, a
#: CPU in seconds to a minute (ViT-H).
ENCODE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
#: Buckets of the decode histogram: milliseconds on a GPU, tenths of a second on a CPU.
DECODE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class EngineStats:
    """What one :class:`~sam_backend.sam.engine.SamEngine` counts and times.

    Example:
        >>> stats = EngineStats()
        >>> stats.in_flight.inc()
        >>> stats.in_flight._value.get()
        1.0
    """

    def __init__(self):
        self.encode_seconds = Histogram(
            "sam_encode_seconds", "Image encoder time per image", buckets=ENCODE_BUCKETS, registry=None
        )
        self.decode_seconds = Histogram(
            "sam_decode_seconds", "Prompt encoder and mask decoder time per prompt", buckets=DECODE_BUCKETS,
            registry=None,
        )
        # Summed over the live workers when gunicorn's workers share their metrics.
        self.in_flight = Gauge("sam_images_in_flight", "Images being encoded now", registry=None,
                               multiprocess_mode="livesum")

    def collect(self):
        """The metrics, for a registry collector."""
        for metric in (self.encode_seconds, self.decode_seconds, self.in_flight):
            yield from metric.collect()
