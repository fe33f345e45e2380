"""Logging set-up from ``LOG_LEVEL`` (label-studio-ml's variable)."""

import logging
import os


def configure_logging(level: str | None = None) -> None:
    """Log to stderr at ``level`` (default ``LOG_LEVEL`` or INFO)."""
    level = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
    )
    logging.getLogger("sam_backend").setLevel(getattr(logging, level, logging.INFO))
