"""The ``sam-backend`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from sam_backend import __version__
from sam_backend.logs import configure_logging
from sam_backend.sam.presets import default_preset

logger = logging.getLogger(__name__)

#: The commands that run the model, and so are re-executed under tcmalloc (see :mod:`sam_backend.accel.allocator`).
MODEL_COMMANDS = ("serve", "precompute", "preannotate", "train")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_number(text: str) -> float:
    """An argparse type: a number above 0 (CPUs per Ray actor)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _non_negative_number(text: str) -> float:
    """An argparse type: a number of at least 0 (GPUs per Ray actor)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def _add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]`` and the actor pool's size (:mod:`sam_backend.commands.ray_executor`)."""
    ray = parser.add_argument_group("Ray", "run on a Ray cluster; needs pip install 'sam-backend[ray]'")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run the model in a Ray actor pool: alone, on a Ray instance started on this machine; "
                     "with an address (auto, ray://head:10001), on that cluster")
    ray.add_argument("--ray-actors", type=_positive_int, default=1, help="model workers, each loads the preset once (default 1)")
    ray.add_argument("--ray-cpus-per-actor", type=_positive_number, default=1.0,
                     help="CPUs each worker reserves, and its torch threads (default 1)")
    ray.add_argument("--ray-gpus-per-actor", type=_non_negative_number, default=0.0,
                     help="GPUs each worker reserves; 0.5 lets two share one (default 0)")


def _ray_executor(args: argparse.Namespace, fetch_tasks: int = 4, batch_size: int = 1):
    """The ``RayExecutor`` of ``--ray [ADDRESS]`` and its actor pool flags, or None without ``--ray``."""
    if args.ray is None:
        return None
    from sam_backend.commands.ray_executor import RayExecutor, RayOptions

    options = RayOptions(address=args.ray, actors=args.ray_actors, cpus_per_actor=args.ray_cpus_per_actor,
                         gpus_per_actor=args.ray_gpus_per_actor, fetch_tasks=fetch_tasks, log_level=args.log_level)
    return RayExecutor(options, batch_size=batch_size)


def _ray_missing(args: argparse.Namespace) -> bool:
    """With ``--ray``, whether Ray is missing (logged, naming the extra): checked before anything else."""
    if args.ray is None:
        return False
    from sam_backend.commands.ray_executor import RayUnavailableError, require_ray

    try:
        require_ray()
    except RayUnavailableError as exc:
        logger.error("%s", exc)
        return True
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-backend", description="Segment Anything as a Label Studio ML backend.")
    parser.add_argument("--version", action="version", version=f"sam-backend {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the ML backend with gunicorn")
    serve.add_argument("--preset", default=None, help="keras-hub SAM preset: sam_base_sa1b, kaggle://..., hf://..., "
                       "a local directory, or the name of a preset shipped in sam_backend/presets (default: SAM_PRESET, else sam_base_sa1b)")
    serve.add_argument("--concept-preset", default=None,
                       help="SAM 3 preset for concept prompts (a phrase or an exemplar box finds every instance): "
                       "sam3_pcs, kaggle://..., hf://..., or a local directory (default SAM_CONCEPT_PRESET, else none); "
                       "needs pip install 'sam-backend[concepts]'")
    serve.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"), help="address to bind (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=_env_int("PORT", 9090), help="port (default 9090)")
    serve.add_argument("--workers", type=int, default=_env_int("WORKERS", 1),
                       help="gunicorn worker processes; each holds a model (default WORKERS or 1)")
    serve.add_argument("--threads", type=int, default=_env_int("THREADS", 8),
                       help="threads per worker, so /health answers while a mask is computed (default THREADS or 8)")
    serve.add_argument("--timeout", type=int, default=_env_int("SAM_WORKER_TIMEOUT", 300),
                       help="seconds before gunicorn restarts a silent worker (default 300)")
    serve.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING...")
    serve.add_argument("--cache-dir", default=None, help="embedding store shared by the workers and kept across "
                       "restarts (default SAM_CACHE_DIR, else $MODEL_DIR/sam-backend-embeddings, else the temp dir)")

    tiny = commands.add_parser("tiny-preset", help="write a small random-weight preset to try and test offline")
    tiny.add_argument("model", choices=("sam3",), help="sam3: SAM 3 for concept prompts, with its tokenizer")
    tiny.add_argument("directory", help="where to write it (created)")
    tiny.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    tiny.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING...")

    check = commands.add_parser("healthcheck", help="exit 0 when the local server answers /health (for Docker)")
    check.add_argument("--url", default=None, help="default http://127.0.0.1:$PORT")

    cache = commands.add_parser("cache", help="show or empty the embedding store")
    cache.add_argument("action", choices=("stats", "clear"), help="stats: entries and size; clear: delete every entry")
    cache.add_argument("--cache-dir", default=None, help="the store directory (default as for serve)")
    cache.add_argument("--json", action="store_true", help="stats as JSON")
    cache.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING...")

    precompute = commands.add_parser("precompute", help="encode every task image of a Label Studio project into "
                                     "the embedding store (resumable)")
    precompute.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL"),
                            help="Label Studio's address (default LABEL_STUDIO_URL)")
    precompute.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                            help="a personal access token (default LABEL_STUDIO_API_KEY)")
    precompute.add_argument("--project", type=int, required=True, help="project id")
    precompute.add_argument("--preset", default=None, help="SAM preset (default SAM_PRESET, else sam_base_sa1b); "
                            "the server must use the same one to find the embeddings")
    precompute.add_argument("--concept-preset", default=None,
                            help="SAM 3 preset whose vision features to store too, so that a first phrase costs its "
                            "decode only (default SAM_CONCEPT_PRESET, else none); the server must use the same one")
    precompute.add_argument("--concepts-only", action="store_true",
                            help="store SAM 3's features only, not SAM's (a project prompted by phrases only)")
    precompute.add_argument("--view", type=int, default=None, help="only the tasks of this data manager view (tab) id")
    precompute.add_argument("--cache-dir", default=None, help="the store to fill (default as for serve)")
    precompute.add_argument("--data-key", default=None,
                            help="task data field with the image URL (default: from the project's label config)")
    precompute.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:1 (default SAM_DEVICE, "
                            "else CUDA when present)")
    precompute.add_argument("--fetch-threads", type=int, default=4, help="parallel image downloads (default 4)")
    precompute.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    precompute.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "WARNING"), help="DEBUG, INFO, WARNING...")
    _add_ray_arguments(precompute)

    pre = commands.add_parser("preannotate", help="masks for every task of a Label Studio project (resumable)")
    pre.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL"), help="Label Studio's address (default LABEL_STUDIO_URL)")
    pre.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                     help="a personal access token (default LABEL_STUDIO_API_KEY)")
    pre.add_argument("--project", type=int, required=True, help="project id")
    pre.add_argument("--preset", default=None, help="SAM preset (default SAM_PRESET, else sam_base_sa1b); "
                     "the model version of the predictions follows it")
    pre.add_argument("--concept-preset", default=None,
                     help="SAM 3 preset of --mode concepts (default SAM_CONCEPT_PRESET); its model version names the predictions")
    pre.add_argument("--concept", action="append", default=None, metavar="LABEL=PHRASE",
                     help="--mode concepts: the phrase searched for LABEL (repeatable; default the label's hint, "
                     "alias or name)")
    pre.add_argument("--mode", default=None, choices=("boxes", "auto", "boxes-then-auto", "concepts"),
                     help="where prompts come from (default SAM_PRELABEL, else boxes)")
    pre.add_argument("--output", default=None, choices=("brush", "polygon", "both"),
                     help="what masks become when the label config has both a brush and polygons "
                     "(default SAM_OUTPUT, else brush)")
    pre.add_argument("--view", type=int, default=None, help="only the tasks of this data manager view (tab) id")
    pre.add_argument("--limit", type=_positive_int, default=None, help="stop after this many tasks")
    pre.add_argument("--overwrite", action="store_true", help="recompute tasks that have our prediction and replace it")
    pre.add_argument("--dry-run", action="store_true", help="compute, but upload nothing")
    pre.add_argument("--batch-size", type=_positive_int, default=16, help="tasks per upload, and per encoder call on a GPU (default 16)")
    pre.add_argument("--cache-dir", default=None, help="embedding store to use and fill (default as for serve)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    pre.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "WARNING"), help="DEBUG, INFO, WARNING...")
    _add_ray_arguments(pre)
    from sam_backend.commands.train import add_parsers

    add_parsers(commands, _positive_int)
    return parser


def preannotate_command(args: argparse.Namespace) -> int:
    """``sam-backend preannotate``: see :mod:`sam_backend.commands.preannotate`."""
    from sam_backend.server.backend import ModelHolder, SamBackend
    from sam_backend.errors import SamBackendError
    from sam_backend.labelstudio.api import LabelStudioProject
    from sam_backend.labelstudio.media import Credentials
    from sam_backend.commands.preannotate import Preannotator
    from sam_backend.labelstudio.concepts import parse_concept_mapping
    from sam_backend.server.prelabel import PrelabelSettings

    if _ray_missing(args):
        return 2
    if args.cache_dir:
        os.environ["SAM_CACHE_DIR"] = args.cache_dir  # read by the model's store, here or in the Ray actors
    try:
        asked = {"prelabel": args.mode, "output": args.output,
                 "concept_phrases": parse_concept_mapping(args.concept) if args.concept else None}
        settings = PrelabelSettings.from_sources(os.environ, {k: v for k, v in asked.items() if v})
        if settings.mode == "off":  # SAM_PRELABEL=off is for the server; a run asked for means boxes
            settings = dataclasses.replace(settings, mode="boxes")
        concepts = settings.mode == "concepts"
        project = LabelStudioProject(args.url, args.api_key, args.project)
        credentials = Credentials(args.url, args.api_key)
        backend = SamBackend(preset=args.preset or default_preset(), credentials=credentials,
                             concept_preset=args.concept_preset if concepts else None)
        if concepts and args.ray is None and backend.concepts is not None:
            backend.concepts.start().wait()
        if concepts and (args.ray is None or backend.concepts is None):
            backend.concept_tiers()  # no preset, or a load error, ends the run here (on Ray the actors load it)
        elif args.ray is None:  # on Ray the model loads in each actor; here the backend only names the version
            holder = ModelHolder(backend.preset).start()
            holder.wait()
            holder.engine()  # the load error, if any, ends the run here
            backend = SamBackend(holder=holder, credentials=credentials)
        where = f", on Ray ({args.ray}, {args.ray_actors} actor(s))" if args.ray is not None else ""
        version = backend.concept_model_version if concepts else backend.model_version
        sys.stderr.write(f"Pre-annotating project {args.project} at {args.url} with {version} "
                         f"(mode {settings.mode}{', dry run' if args.dry_run else ''}{where})\n")
        summary = Preannotator(backend, project, settings, executor=_ray_executor(args, batch_size=args.batch_size),
                               view=args.view, limit=args.limit, overwrite=args.overwrite, dry_run=args.dry_run,
                               batch_size=args.batch_size, progress=not args.no_progress).run()
    except SamBackendError as exc:
        logger.error("%s", exc)
        return 2
    sys.stdout.write("\n".join(summary.lines(args.dry_run)) + "\n")
    return summary.exit_code


def precompute_command(args: argparse.Namespace) -> int:
    """``sam-backend precompute``: see :mod:`sam_backend.commands.precompute`."""
    from sam_backend.commands.precompute import Precomputer, image_data_key, open_precompute_tiers
    from sam_backend.embeddings.settings import open_store
    from sam_backend.errors import SamBackendError
    from sam_backend.labelstudio.api import LabelStudioProject
    from sam_backend.labelstudio.media import Credentials

    if _ray_missing(args):
        return 2
    concept_preset = args.concept_preset or os.environ.get("SAM_CONCEPT_PRESET") or None
    if args.concepts_only and not concept_preset:
        logger.error("--concepts-only needs a SAM 3 preset: --concept-preset sam3_pcs (or SAM_CONCEPT_PRESET).")
        return 2
    try:
        project = LabelStudioProject(args.url, args.api_key, args.project)
        # Check Label Studio and the store before the model loads (a minute for a large preset).
        data_key = args.data_key or image_data_key(project.label_config())
        store = open_store(cache_dir=args.cache_dir, required=True)
        preset = None if args.concepts_only else args.preset or default_preset()
        names = " and ".join(f"{kind} {name}" for kind, name in (("SAM", preset), ("SAM 3", concept_preset)) if name)
        executor = _ray_executor(args, fetch_tasks=args.fetch_threads)
        embeddings = concepts = None
        if executor is not None:
            # The actors open the same store (SAM_CACHE_URL, else this directory, which must be shared on a cluster).
            where = f"on Ray ({args.ray}, {args.ray_actors} actor(s))"
        else:
            embeddings, concepts = open_precompute_tiers(store, preset, concept_preset, device=args.device)
            loaded = (embeddings or concepts).engine
            where = f"on {loaded.device_name} ({loaded.precision})"
        sys.stderr.write(f"Precomputing project {args.project} at {args.url} with {names} {where} "
                         f"into {store.location}\n")
        summary = Precomputer(embeddings, project, Credentials(args.url, args.api_key), view=args.view,
                              data_key=data_key, fetch_threads=args.fetch_threads, progress=not args.no_progress,
                              executor=executor, preset=preset, device=args.device, cache_dir=args.cache_dir,
                              concepts=concepts, concept_preset=concept_preset).run()
    except SamBackendError as exc:
        logger.error("%s", exc)
        return 2
    sys.stdout.write("\n".join(summary.lines()) + "\n")
    return summary.exit_code


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def cache_command(args: argparse.Namespace) -> int:
    """``sam-backend cache stats|clear``: what the store holds, or empty it."""
    import json

    from sam_backend.errors import StoreError
    from sam_backend.embeddings.settings import open_store

    try:
        store = open_store(cache_dir=args.cache_dir, required=True)
        if args.action == "clear":
            count = store.clear()
            logger.info("Deleted %d embedding(s) from %s", count, store.location)
            return 0
        stats = store.stats()
    except StoreError as exc:
        logger.error("%s", exc)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(stats.__dict__, indent=2) + "\n")
        return 0
    budget = f" of {_size(stats.budget_bytes)}" if stats.budget_bytes else ""
    lines = [f"{store.location} ({store.tier}): {stats.entries} embedding(s), {_size(stats.bytes)}{budget}"]
    for fingerprint, (count, size) in sorted(stats.presets.items()):
        lines.append(f"  preset {fingerprint[:16]}: {count} embedding(s), {_size(size)}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def healthcheck(args: argparse.Namespace) -> int:
    """GET /health (with the server's own basic auth, if any); 0 when it says UP."""
    import requests

    url = args.url or f"http://127.0.0.1:{os.environ.get('PORT', '9090')}"
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    try:
        response = requests.get(url.rstrip("/") + "/health", timeout=2, auth=(user, password) if user and password else None)
        return 0 if response.ok and response.json().get("status") == "UP" else 1
    except (requests.RequestException, ValueError):
        return 1


def serve(args: argparse.Namespace) -> None:
    """Run gunicorn on the Flask app; the model loads in each worker, in the background."""
    from gunicorn.app.base import BaseApplication

    from sam_backend import gunicorn_conf

    if args.preset:
        os.environ["SAM_PRESET"] = args.preset  # read by each worker's app factory
    if args.concept_preset:
        os.environ["SAM_CONCEPT_PRESET"] = args.concept_preset
    if args.cache_dir:
        os.environ["SAM_CACHE_DIR"] = args.cache_dir  # read by each worker's model loader
    os.environ["LOG_LEVEL"] = args.log_level  # read by each worker's logging set-up
    os.environ["THREADS"] = str(args.threads)  # how many requests a worker lets wait for its model
    options = {
        "bind": f"{args.host}:{args.port}",
        "workers": args.workers,
        "threads": args.threads,
        "worker_class": "gthread",
        "timeout": args.timeout,
        "loglevel": args.log_level.lower(),
        "accesslog": "-",
        "errorlog": "-",
        # /metrics sums every worker's figures (see sam_backend.gunicorn_conf).
        "on_starting": gunicorn_conf.on_starting,
        "child_exit": gunicorn_conf.child_exit,
        "on_exit": gunicorn_conf.on_exit,
    }

    class Server(BaseApplication):
        def load_config(self):
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            # The same entry point as `gunicorn sam_backend.wsgi:app` (Docker),
            # imported in each worker; it reads SAM_PRESET and LOG_LEVEL set above.
            from sam_backend.wsgi import app

            return app

    logger.info("Serving %s on http://%s:%d with %d worker(s) x %d thread(s)",
                default_preset(), args.host, args.port, args.workers, args.threads)
    Server().run()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sam-backend`` script."""
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", None))
    if args.command in MODEL_COMMANDS:
        from sam_backend.accel.allocator import ensure_allocator, log_allocator

        # Before torch is imported; only a real command line can be started
        # again, so main([...]) called from Python (the tests) runs as it is.
        log_allocator(ensure_allocator() if argv is None else None)
    if args.command == "healthcheck":
        return healthcheck(args)
    if args.command == "tiny-preset":
        from sam_backend.sam3.tiny import write_tiny_concept_preset

        sys.stdout.write(f"{write_tiny_concept_preset(args.directory, seed=args.seed)}\n")
        return 0
    if args.command == "preannotate":
        return preannotate_command(args)
    if args.command == "cache":
        return cache_command(args)
    if args.command == "precompute":
        return precompute_command(args)
    if args.command in ("train", "versions"):
        from sam_backend.commands.train import train_command, versions_command

        return train_command(args) if args.command == "train" else versions_command(args)
    serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
