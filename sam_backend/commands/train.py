"""``sam-backend train`` and ``sam-backend versions``: a project's decoder, trained from its annotations.

``train --project ID`` runs one training (:class:`~sam_backend.learning.project.ProjectTrainer`)
in the foreground: on a GPU box, to train on a whole existing project, or as
the server's background process after "Start Training". ``versions`` lists a
project's versions with their held-out figures, and pins one (or unpins).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from sam_backend.sam.presets import default_preset, preset_model_version

logger = logging.getLogger(__name__)

#: ``train``'s exit status when another training of the project holds its lock.
EXIT_BUSY = 75


def add_parsers(commands, positive_int) -> None:
    """The ``train`` and ``versions`` sub-commands."""
    train = commands.add_parser("train", help="train a project's decoder on its annotations (gated: never worse)")
    train.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL"), help="Label Studio's address (default LABEL_STUDIO_URL)")
    train.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                       help="a personal access token (default LABEL_STUDIO_API_KEY)")
    train.add_argument("--project", type=int, required=True, help="project id")
    train.add_argument("--preset", default=None, help="SAM preset (default SAM_PRESET, else sam_base_sa1b)")
    train.add_argument("--device", default=None, help="torch device (default SAM_DEVICE, else CUDA when present)")
    train.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    train.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority by this much")
    train.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default SAM_TRAIN_STEPS, else 120)")
    train.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING...")

    versions = commands.add_parser("versions", help="list a project's trained versions, or pin one")
    versions.add_argument("--project", type=int, default=None, help="project id (default: every project)")
    versions.add_argument("--preset", default=None, help="SAM preset (default SAM_PRESET, else sam_base_sa1b)")
    what = versions.add_mutually_exclusive_group()
    what.add_argument("--pin", type=positive_int, default=None, metavar="N",
                      help="use version N from now on, whatever later trainings find")
    what.add_argument("--unpin", action="store_true", help="use the newest accepted version again")
    versions.add_argument("--json", action="store_true", help="print JSON")
    versions.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "WARNING"), help="DEBUG, INFO, WARNING...")


def _versions_store(preset: str):
    from sam_backend.learning.versions import VersionStore, default_versions_dir

    return VersionStore(default_versions_dir(), preset, preset_model_version(preset))


def train_command(args: argparse.Namespace) -> int:
    """Exit 0 when the training ran (a version accepted or rejected, or nothing to train on), 1 when it failed,
    75 when the project is training already, 130 when interrupted (nothing written)."""
    from sam_backend.embeddings.settings import open_store
    from sam_backend.embeddings.tiers import EmbeddingTiers
    from sam_backend.errors import SamBackendError
    from sam_backend.labelstudio.api import LabelStudioProject
    from sam_backend.labelstudio.media import Credentials
    from sam_backend.learning.project import ProjectTrainer, TrainingOutcome
    from sam_backend.learning.tuning import Interrupted, TuneSettings
    from sam_backend.learning.versions import TrainingBusy
    from sam_backend.server.loading import load_engine

    if args.nice:
        os.nice(args.nice)
    preset = args.preset or default_preset()
    versions = _versions_store(preset)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # a restart stops a training cleanly: nothing half-written
    try:
        settings = TuneSettings.from_env()
        if args.steps:
            settings.steps = args.steps
        project = LabelStudioProject(args.url, args.api_key, args.project)
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        engine = load_engine(preset, device=args.device, warm_up=False)
        tiers = EmbeddingTiers(engine, store=open_store())
        trainer = ProjectTrainer(tiers, project, versions, Credentials(args.url, args.api_key), settings=settings)
        outcome = trainer.run(should_stop=stop.is_set)
    except TrainingBusy as exc:
        logger.warning("%s", exc)
        return EXIT_BUSY
    except Interrupted:
        logger.warning("Project %s: training interrupted; nothing was written", args.project)
        return 130
    except (SamBackendError, ValueError) as exc:
        logger.error("Project %s: training failed: %s", args.project, exc)
        versions.record_outcome(args.project, TrainingOutcome(args.project, "failed", str(exc)).as_dict())
        return 1
    sys.stdout.write(f"{outcome.status}: {outcome.reason}\n")
    for task, why in list(outcome.problems.items())[:20]:
        sys.stdout.write(f"  task {task} left out: {why}\n")
    return 1 if outcome.status == "failed" else 0


def versions_command(args: argparse.Namespace) -> int:
    """List versions (``--project``: one project's), or pin or unpin one."""
    import json

    from sam_backend.learning.versions import VersionError

    store = _versions_store(args.preset or default_preset())
    if (args.pin or args.unpin) and args.project is None:
        logger.error("--pin and --unpin need --project")
        return 2
    try:
        if args.pin or args.unpin:
            info = store.pin(args.project, None if args.unpin else args.pin)
            sys.stdout.write(f"project {args.project} now uses {info.name if info else 'the preset'}"
                             f"{' (pinned)' if args.pin else ''}\n")
            return 0
    except VersionError as exc:
        logger.error("%s", exc)
        return 1
    projects = [args.project] if args.project is not None else store.projects()
    listing = []
    for project in projects:
        pointer = store.pointer(project)
        for info in store.versions(project):
            listing.append({"project": project, "version": info.number, "name": info.name,
                            "in_use": info.number == pointer.get("version"),
                            "pinned": info.number == pointer.get("version") and bool(pointer.get("pinned")),
                            "accepted": info.accepted, "before": info.before, "after": info.after,
                            "details": info.details, "reason": info.reason})
    if args.json:
        sys.stdout.write(json.dumps(listing, indent=1) + "\n")
        return 0
    if not listing:
        sys.stdout.write(f"no trained versions in {store.root / store.preset}\n")
        return 0
    for row in listing:
        mark = "*" if row["in_use"] else " "
        state = "accepted" if row["accepted"] else "rejected"
        after, before = row["after"], row["before"]
        sys.stdout.write(
            f"{mark} p{row['project']} v{row['version']:<3} {state:8} held-out mean IoU {before.get('mean_iou', 0):.3f}"
            f" -> {after.get('mean_iou', 0):.3f} (click {after.get('click_iou', 0):.3f}, box {after.get('box_iou', 0):.3f},"
            f" {row['details'].get('training_tasks', '?')} training task(s)){'  pinned' if row['pinned'] else ''}\n")
    sys.stdout.write("* in use\n")
    return 0
