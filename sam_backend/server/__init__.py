"""The ML backend that Label Studio talks to.

Holds the Flask application factory (:mod:`.app`), :class:`~.backend.SamBackend`
(requests to masks), budgets and late predictions (:mod:`.jobs`),
pre-labelling without a click (:mod:`.prelabel`), refinement state
(:mod:`.refinement`) and Prometheus metrics (:mod:`.metrics`). Gunicorn's
entry point is :mod:`sam_backend.wsgi`.

May import everything below it: ``sam_backend.sam``, ``sam_backend.embeddings``,
``sam_backend.labelstudio``. Never ``sam_backend.commands``.
"""
