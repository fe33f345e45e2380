"""Gunicorn hooks that make ``/metrics`` cover every worker.

``sam-backend serve`` installs them itself; to run gunicorn directly (the
Docker image does), pass this module as its config::

    gunicorn -c python:sam_backend.gunicorn_conf sam_backend.wsgi:app

- ``on_starting`` (in the master, before any worker exists) points
  ``PROMETHEUS_MULTIPROC_DIR`` at a fresh temp directory, or empties the one
  already set, so each worker's prometheus-client keeps its values in files
  there and any worker's ``/metrics`` reads them all
  (:mod:`sam_backend.server.metrics`);
- ``child_exit`` drops a dead worker's live gauges (``mark_process_dead``);
  its counters stay, so totals do not fall when gunicorn replaces a worker;
- ``on_exit`` removes the temp directory it made.

The master must not create metrics before ``on_starting``: prometheus-client
reads the variable when it is first imported, and the workers inherit the
master's modules. So this module imports prometheus-client only in its hooks.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)

_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The directory ``on_starting`` created (removed by ``on_exit``); None when the user chose one.
_created: str | None = None


def prepare_metrics_dir() -> str:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` for this server's workers: a fresh temp dir, or the given one emptied.

    Values of a previous server in the directory would otherwise be added to
    this one's.
    """
    global _created
    directory = os.environ.get(_ENV) or os.environ.get("prometheus_multiproc_dir")
    if directory:
        os.makedirs(directory, exist_ok=True)
        for path in glob.glob(os.path.join(directory, "*.db")):
            os.remove(path)
    else:
        directory = _created = tempfile.mkdtemp(prefix="sam-backend-metrics-")
    os.environ[_ENV] = directory
    logger.debug("Worker metrics are kept in %s", directory)
    return directory


def on_starting(server) -> None:
    """Gunicorn hook, in the master before the workers start."""
    prepare_metrics_dir()


def child_exit(server, worker) -> None:
    """Gunicorn hook, in the master after a worker exited: its live gauges go."""
    if os.environ.get(_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    """Gunicorn hook, in the master as it exits: remove the temp directory it made."""
    global _created
    if _created:
        shutil.rmtree(_created, ignore_errors=True)
        _created = None
