"""Naming and loading keras-hub SAM presets."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

from sam_backend.errors import PresetLoadError

logger = logging.getLogger(__name__)

#: Presets shipped inside the package, addressable by their directory name.
SHIPPED_PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
DEFAULT_PRESET = "sam_base_sa1b"
BUILTIN_SAM_PRESETS = ("sam_base_sa1b", "sam_large_sa1b", "sam_huge_sa1b")


def default_preset() -> str:
    """``SAM_PRESET`` from the environment, else ``sam_base_sa1b``."""
    return os.environ.get("SAM_PRESET") or DEFAULT_PRESET


def preset_model_version(preset: str) -> str:
    """The ``model_version`` of predictions from ``preset``'s own decoder, e.g. ``sam_base_sa1b@sam-backend-0.4.0``.

    A project's trained versions extend it (``...+p12.v3``).
    """
    from sam_backend import __version__

    name = os.path.basename(os.path.normpath(preset)) or preset
    return f"{name}@sam-backend-{__version__}"


def resolve_preset(preset: str) -> str:
    """What to hand to ``from_preset``: a shipped preset's directory, or ``preset`` itself."""
    shipped = SHIPPED_PRESETS_DIR / preset
    if "/" not in preset and (shipped / "config.json").is_file():
        return str(shipped)
    return os.path.expanduser(preset)


def shipped_presets() -> list[str]:
    """Names of the presets shipped inside the package."""
    if not SHIPPED_PRESETS_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_PRESETS_DIR.iterdir() if (p / "config.json").is_file())


def _shipped_hint() -> str:
    names = shipped_presets()
    return f", or use a preset shipped with sam-backend: {', '.join(names)}" if names else ""


def describe_source(preset: str) -> str:
    """Where keras-hub will look for ``preset``, in words for an error message."""
    resolved = resolve_preset(preset)
    if resolved.startswith(("kaggle://", "hf://", "modelscope://", "gs://", "s3://")):
        return f"the remote handle {resolved}"
    if preset in BUILTIN_SAM_PRESETS:
        return f"the built-in preset {preset!r}, downloaded from Kaggle on first use"
    if os.path.isdir(resolved):
        return f"the local directory {resolved}"
    if os.sep in resolved or resolved.startswith("."):
        return f"the local directory {resolved} (which does not exist)"
    return f"{preset!r}, which is neither a built-in SAM preset nor an existing directory"


#: File descriptor 2 is the whole process's: one silencing at a time. Two overlapping
#: ones (SAM and SAM 3 loading in two threads) would let the second save the first's
#: /dev/null and put it back last, and every later log line of the worker would vanish.
_STDERR_LOCK = threading.Lock()
_KERAS_HUB_LOCK = threading.Lock()
_keras_hub = None


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence C++ log lines written straight to file descriptor 2.

    TensorFlow (imported by keras-hub through tensorflow-text, where a plain pip
    install put it) prints absl
    messages before ``TF_CPP_MIN_LOG_LEVEL`` takes effect; Python exceptions
    are unaffected. Threads take turns: file descriptor 2 is restored as it was.
    """
    with _STDERR_LOCK:
        try:
            saved = os.dup(2)
        except OSError:
            yield
            return
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def import_keras_hub():
    """Import keras-hub (and with it TensorFlow) without its start-up noise, once.

    Only the first import is silenced: a later caller's thread neither waits
    for fd 2 nor hides another thread's log lines.
    """
    global _keras_hub
    if _keras_hub is None:
        with _KERAS_HUB_LOCK:
            if _keras_hub is None:
                with quiet_native_stderr():
                    import keras_hub  # noqa: PLC0415
                _keras_hub = keras_hub
    return _keras_hub


def error_summary(exc: BaseException) -> str:
    """``Type: first line of the message``: keras-hub's load errors can run to pages."""
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message.splitlines()[0] if message else type(exc).__name__}"


def load_segmenter(preset: str):
    """Load a ``keras_hub.models.SAMImageSegmenter`` from ``preset``.

    Args:
        preset: a built-in name (``sam_base_sa1b``...), ``kaggle://``,
            ``hf://``, a local preset directory, or the name of a preset shipped
            with this package (a directory name under ``sam_backend/presets``).

    Raises:
        PresetLoadError: one message that says what was tried and how to
            point at a local preset instead.
    """
    keras_hub = import_keras_hub()
    resolved = resolve_preset(preset)
    logger.info("Loading SAM preset %s from %s", preset, describe_source(preset))
    try:
        model = keras_hub.models.SAMImageSegmenter.from_preset(resolved)
    except Exception as exc:  # keras-hub raises many kinds; all mean "cannot load"
        raise PresetLoadError(
            f"Could not load the SAM preset {preset!r} from {describe_source(preset)}: "
            f"{error_summary(exc)}. Without network access, point --preset "
            "(or SAM_PRESET) at a local preset directory made with save_to_preset"
            f"{_shipped_hint()}."
        ) from exc
    if not isinstance(model, keras_hub.models.SAMImageSegmenter):
        raise PresetLoadError(f"The preset {preset!r} did not load as a SAMImageSegmenter.")
    return model
