"""Loading the model the way every process that serves or pre-annotates does."""

from __future__ import annotations

from sam_backend.accel import accelerate
from sam_backend.sam.engine import SamEngine


def load_engine(preset: str, device: str | None = None, warm_up: bool = True) -> SamEngine:
    """SAM from ``preset``, with the enabled accelerations applied, warmed up unless asked not to.

    Every server worker, command and Ray actor loads through here, so that
    they all pick the same encoder precision on the same hardware, and so
    the embedding store keys they write agree.

    Example:
        >>> engine = load_engine("demo")  # doctest: +SKIP
        >>> engine.decode(engine.encode("street.jpg"), points=[[400, 300]], labels=[1]).score  # doctest: +SKIP
        0.97
    """
    engine = SamEngine.from_preset(preset, device=device)
    # The one call into sam_backend.accel: without it (or the package) the model is the same, only slower.
    accelerate(engine)
    if warm_up:
        engine.warm_up()
    return engine
