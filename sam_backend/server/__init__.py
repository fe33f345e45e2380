"""The ML backend that Label Studio talks to.

Holds the Flask application factory (:mod:`.app`), :class:`~.backend.SamBackend`
(requests to masks), budgets and late predictions (:mod:`.jobs`),
pre-labelling without a click (:mod:`.prelabel`), refinement state
(:mod:`.refinement`), the state every worker shares (:mod:`.shared_state`),
look-ahead encoding (:mod:`.lookahead`), trainings started by Label Studio's
events (:mod:`.training`) and Prometheus metrics over all workers (:mod:`.metrics`). Gunicorn's entry
point is :mod:`sam_backend.wsgi`, its hooks :mod:`sam_backend.gunicorn_conf`.

May import everything below it: ``sam_backend.sam``, ``sam_backend.embeddings``,
``sam_backend.labelstudio``, ``sam_backend.learning``. Never ``sam_backend.commands``.
"""
