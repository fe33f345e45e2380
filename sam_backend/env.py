"""Optional numeric settings from the environment, read leniently.

A typo in an optional setting must not keep the server from starting: it is
logged and the default is used. Settings whose typo would lose data (the
store's budget) raise instead, where they are read.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

logger = logging.getLogger(__name__)


def env_number(name: str, default: float, environ: Mapping[str, str] | None = None) -> float:
    """The number in ``name``, or ``default`` when it is unset, empty or malformed (logged).

    Example:
        >>> env_number("SAM_EXAMPLE_SECONDS", 30.0, {"SAM_EXAMPLE_SECONDS": "2.5"})
        2.5
        >>> env_number("SAM_EXAMPLE_SECONDS", 30.0, {})
        30.0
    """
    raw = ((os.environ if environ is None else environ).get(name) or "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        logger.warning("%s must be a number; got %r, using %g.", name, raw, default)
        return default
