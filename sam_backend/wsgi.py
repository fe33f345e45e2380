"""WSGI entry point: ``gunicorn -c python:sam_backend.gunicorn_conf sam_backend.wsgi:app``.

Each gunicorn worker imports this module itself (no ``--preload``), so each
loads the model once, in the background, at start. The workers share what
``/setup`` said and the refinement state through the embedding store's
directory or Redis (:mod:`sam_backend.server.shared_state`), and, with
:mod:`sam_backend.gunicorn_conf`'s hooks, their ``/metrics``.
"""

from sam_backend.accel.allocator import log_allocator_once
from sam_backend.logs import configure_logging
from sam_backend.server.app import create_app

configure_logging()
# Under `sam-backend serve` the master logged it; run by gunicorn directly (Docker), each worker does.
log_allocator_once()
app = create_app()
