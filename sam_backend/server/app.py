"""Label Studio's ML backend protocol on Flask (application factory).

Endpoints: ``GET /`` and ``/health``, ``POST /setup``, ``POST /predict``,
``POST /webhook``, ``GET /versions``, ``GET /metrics``. Every failure answers
``{"error": "..."}`` with a fitting status; nothing takes the worker down.
"""

from __future__ import annotations

import hmac
import logging
import os
import time

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from sam_backend import __version__
from sam_backend.env import env_number
from sam_backend.server.fast_json import FastJSONProvider
from sam_backend.server.backend import SamBackend
from sam_backend.errors import (
    BadRequestError,
    ImageError,
    LabelConfigError,
    MediaFetchError,
    MediaRefusedError,
    MediaTimeoutError,
    MediaTooLargeError,
    ModelNotReadyError,
    NotConfiguredError,
    SamBackendError,
)
from sam_backend.server.metrics import Metrics
from sam_backend.server.training import TrainingService
from sam_backend.server.shared_state import open_shared_state

logger = logging.getLogger(__name__)

#: Status code for each kind of failure; the first matching class wins.
STATUS_BY_ERROR = (
    (BadRequestError, 400),
    (ImageError, 422),
    (LabelConfigError, 422),
    # Our refusal to fetch from where the task points, not the media host's (that is a 502).
    (MediaRefusedError, 403),
    (MediaTooLargeError, 422),
    (MediaTimeoutError, 504),
    (MediaFetchError, 502),
    (ModelNotReadyError, 503),
    # Asked for what this server was not started with (concept prompts without --concept-preset).
    (NotConfiguredError, 501),
)
RETRY_AFTER_SECONDS = 10
#: Largest request body, in MB; ``SAM_MAX_REQUEST_MB`` overrides it. Label
#: Studio's /predict for 100 tasks is a few MB.
DEFAULT_MAX_REQUEST_MB = 50.0


def max_request_bytes() -> int:
    """``SAM_MAX_REQUEST_MB`` in bytes (default 50 MB)."""
    return int(env_number("SAM_MAX_REQUEST_MB", DEFAULT_MAX_REQUEST_MB) * 1024 * 1024)


def reason_phrase(message: str, limit: int = 300) -> str:
    """``message`` as an HTTP reason phrase: one line of printable ASCII, at most ``limit`` characters.

    Example:
        >>> reason_phrase("The phrase «bottle» is\ttoo long")
        'The phrase bottle is too long'
    """
    import unicodedata

    text = unicodedata.normalize("NFKD", message).encode("ascii", "ignore").decode()
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def status_for(error: SamBackendError) -> int:
    """The HTTP status for a backend error."""
    for cls, status in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return status
    return 500


def create_app(backend: SamBackend | None = None, start_loading: bool = True) -> Flask:
    """Build the Flask app around a :class:`SamBackend`.

    Args:
        backend: the backend to serve; one for ``SAM_PRESET`` by default.
        start_loading: start loading the model in the background now.

    Basic auth is on when ``BASIC_AUTH_USER`` and ``BASIC_AUTH_PASS`` are set;
    bodies above ``SAM_MAX_REQUEST_MB`` are answered 413 unread.

    Example:
        >>> app = create_app(SamBackend(preset="sam_base_sa1b"))  # doctest: +SKIP
        >>> app.test_client().get("/health").json["status"]  # doctest: +SKIP
        'UP'
    """
    # The server's own backend shares /setup and refinement state with the other workers.
    backend = backend or SamBackend(shared=open_shared_state())
    if start_loading:
        backend.holder.start()
        if backend.concepts is not None:  # SAM 3 loads beside SAM, in the background too
            backend.concepts.start()
    app = Flask("sam_backend")
    app.json = FastJSONProvider(app)
    app.json.sort_keys = False
    app.config["MAX_CONTENT_LENGTH"] = max_request_bytes()
    app.extensions["sam_backend"] = backend
    metrics = Metrics.create()
    training = TrainingService(backend)
    app.extensions["sam_training"] = training
    metrics.watch(lambda: [source for source in (getattr(backend.holder.loaded_engine, "stats", None),
                                                 backend.holder.loaded_embeddings, backend.lookahead, training)
                           if source is not None])

    def model_gauges():
        metrics.model_loaded.set(1 if backend.holder.state == "ready" else 0)
        if backend.holder.load_seconds is not None:
            metrics.model_load_seconds.set(backend.holder.load_seconds)

    metrics.on_refresh(model_gauges)
    app.extensions["sam_metrics"] = metrics
    auth_user = os.environ.get("BASIC_AUTH_USER")
    auth_pass = os.environ.get("BASIC_AUTH_PASS")

    @app.before_request
    def check_auth():
        metrics.requests.labels(request.endpoint or "unknown").inc()
        if not (auth_user and auth_pass):
            return None
        auth = request.authorization
        user_ok = hmac.compare_digest((auth.username or "") if auth else "", auth_user)
        pass_ok = hmac.compare_digest((auth.password or "") if auth else "", auth_pass)
        if user_ok and pass_ok:
            return None
        response = jsonify(error="Authentication required: set the backend's basic auth user and password in Label Studio's model settings.")
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="sam-backend"'
        return response

    @app.errorhandler(SamBackendError)
    def backend_error(error: SamBackendError):
        status = status_for(error)
        metrics.errors.labels(request.endpoint or "unknown", str(status)).inc()
        logger.warning("%s %s -> %d: %s", request.method, request.path, status, error)
        response = jsonify(error=str(error))
        # Label Studio 1.23 shows the annotator only the status line of an error (``str(HTTPError)``),
        # not the body: the message goes in the reason phrase too.
        response.status = f"{status} {reason_phrase(str(error))}"
        if status == 503:
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        metrics.errors.labels(request.endpoint or "unknown", str(error.code)).inc()
        response = jsonify(error=f"{error.name}: {error.description}")
        response.status_code = error.code or 500
        return response

    @app.errorhandler(RequestEntityTooLarge)
    def body_too_large(error: RequestEntityTooLarge):
        metrics.errors.labels(request.endpoint or "unknown", "413").inc()
        limit = app.config["MAX_CONTENT_LENGTH"]
        logger.warning("%s %s -> 413: body of %s bytes over the %d byte limit", request.method, request.path,
                       request.content_length, limit)
        response = jsonify(error=f"The request body is larger than {limit / (1024 * 1024):.3g} MB "
                                 "(SAM_MAX_REQUEST_MB); send fewer tasks per request or raise the limit.")
        response.status_code = 413
        return response

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception):
        metrics.errors.labels(request.endpoint or "unknown", "500").inc()
        logger.exception("%s %s failed", request.method, request.path)
        response = jsonify(error=f"Internal error in sam-backend ({type(error).__name__}: {error}); see its log.")
        response.status_code = 500
        return response

    def json_body() -> dict:
        body = request.get_json(silent=True)
        if body is None:
            raise BadRequestError("The request body must be JSON (Content-Type: application/json).")
        if not isinstance(body, dict):
            raise BadRequestError("The request body must be a JSON object.")
        return body

    @app.get("/")
    @app.get("/health")
    def health():
        holder = backend.holder
        body = {
            "status": "UP",
            "model_class": "SamBackend",
            "model_state": holder.state,
            "preset": backend.preset,
            "model_version": backend.model_version,
        }
        engine = holder.loaded_engine
        if engine is not None:
            body["encoder_precision"] = getattr(engine, "precision", "float32")
        if holder.error:
            body["error"] = holder.error
        body["lookahead"] = backend.lookahead.status()
        if backend.concepts is not None:
            concepts = {"preset": backend.concept_preset, "state": backend.concepts.state,
                        "model_version": backend.concept_model_version}
            if backend.concepts.error:
                concepts["error"] = backend.concepts.error
            body["concepts"] = concepts
        if backend.decoders.failures:  # trained versions this worker could not load (the previous one answers)
            body["unusable_versions"] = dict(backend.decoders.failures)
        return jsonify(body)

    @app.post("/setup")
    def setup():
        return jsonify(backend.setup(json_body()))

    @app.post("/predict")
    def predict():
        body = json_body()
        if "tasks" not in body:
            raise BadRequestError('The request has no "tasks" list.')
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise BadRequestError("params must be an object.")
        started = time.perf_counter()
        results = backend.predict(
            body["tasks"],
            body.get("label_config"),
            params.get("context"),
            project=body.get("project"),
        )
        metrics.predict_seconds.observe(time.perf_counter() - started)
        return jsonify(results=results, model_version=backend.model_version)

    @app.post("/webhook")
    def webhook():
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise BadRequestError('A webhook body must be a JSON object with an "action".')
        # Answered at once: a project webhook has 1 s; training runs in another process.
        answer = training.handle(body)
        if answer.get("status") != "ignored":
            logger.info("Webhook %s: %s", body.get("action"), answer.get("message", answer.get("status")))
        return jsonify(answer), 201 if answer.get("status") == "started" else 200

    @app.get("/versions")
    def versions():
        names = [backend.model_version]
        store = backend.decoders.store
        if store is not None:
            names += [v.name for p in store.projects() for v in store.versions(p) if v.accepted]
        return jsonify(versions=names, model_version=backend.model_version, backend=__version__)

    @app.get("/metrics")
    def metrics_endpoint():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.expose(), mimetype=CONTENT_TYPE_LATEST)

    return app
