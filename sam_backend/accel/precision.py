"""The image encoder's precision: float32, or bfloat16/float16 where it pays and the masks stay the same.

On CPUs with AMX (Intel Sapphire Rapids and later) a bfloat16 matrix multiply
runs several times faster than a float32 one (6x measured on a 2-core Xeon:
2260 against 374 GFLOP/s), so the ViT-B image encoder under bfloat16 autocast
takes less than half the time (1.51 against 3.37 s in ``bench/speed.py``). Without AMX, bfloat16 is slower than float32, and
on a GPU it has not been measured here: both keep float32 unless asked.

Reduced precision changes the embeddings slightly (about 1 % relative), so it
is only used when the masks it gives equal float32's: :func:`choose_precision`
encodes a generated scene (:func:`parity_scene`) both ways at load and compares, for a
click and a box on each of its shapes (:func:`parity_prompts`), every
candidate mask. It keeps reduced precision only when their mean IoU is at
least :data:`PARITY_MIN_IOU`, with the model's own weights, and (under
``auto``) only when the reduced encode was at least :data:`MIN_SPEEDUP` times
faster: a small model's encode is overhead that bfloat16 does not shorten.

``SAM_PRECISION`` chooses: ``auto`` (the default: bfloat16 on CPUs with AMX,
float32 elsewhere), ``float32``, ``bfloat16`` or ``float16``. An explicit
reduced precision is still checked, and float32 is kept if it fails.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: Environment variable choosing the encoder's precision.
ENV_VAR = "SAM_PRECISION"

#: The mean IoU of reduced-precision masks against float32's below which float32 is kept.
PARITY_MIN_IOU = 0.99

#: How many times faster a reduced-precision encode must be for ``auto`` to keep it
#: (ViT-B on a 2-core AMX Xeon: 2.2x against the float32 attention kernel, 2.8x before it;
#: the small demo preset: 1.2x, measured before it).
MIN_SPEEDUP = 1.5

_NAMES = {
    "auto": "auto",
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def requested_precision() -> str:
    """``SAM_PRECISION`` as ``auto``, ``float32``, ``bfloat16`` or ``float16`` (``auto`` when unset or unknown).

    Example:
        >>> os.environ["SAM_PRECISION"] = "bf16"
        >>> requested_precision()
        'bfloat16'
        >>> del os.environ["SAM_PRECISION"]
    """
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    if not raw:
        return "auto"
    if raw not in _NAMES:
        logger.warning("%s=%r is not one of auto, float32, bfloat16, float16; using auto.", ENV_VAR, raw)
        return "auto"
    return _NAMES[raw]


def cpu_has_amx_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 matrices in AMX tiles (and the kernel lets torch use them).

    Example:
        >>> cpu_has_amx_bf16()  # doctest: +SKIP
        True
    """
    try:
        flags = next((line for line in Path(cpuinfo).read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    if "amx_bf16" not in flags.split():
        return False
    try:
        import torch

        init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
        # Linux hands AMX tile state to a process only when asked; torch asks here.
        return bool(init()) if init is not None else True
    except Exception:  # an unknown torch: trust the CPU flag
        return True


def candidate_precision(device_type: str, requested: str | None = None) -> str:
    """The precision to try on ``device_type`` (``"cpu"``, ``"cuda"``...), before the parity check.

    ``auto`` is bfloat16 on a CPU with AMX and float32 everywhere else.

    Example:
        >>> candidate_precision("cuda", "auto")
        'float32'
        >>> candidate_precision("cpu", "float16")
        'float16'
    """
    requested = requested or requested_precision()
    if requested != "auto":
        return requested
    return "bfloat16" if device_type == "cpu" and cpu_has_amx_bf16() else "float32"


@dataclass
class ParityReport:
    """How reduced-precision masks compare with float32's on the parity scene.

    Attributes:
        precision: the reduced precision that was compared.
        ious: IoU of every candidate mask of every prompt against float32's.
        seconds: the fastest reduced-precision encode (after a first one that pays its one-time costs).
        float32_seconds: the fastest float32 encode of the same scene.
    """

    precision: str
    ious: np.ndarray
    seconds: float
    float32_seconds: float = float("inf")

    @property
    def mean_iou(self) -> float:
        return float(self.ious.mean()) if self.ious.size else 0.0

    @property
    def min_iou(self) -> float:
        return float(self.ious.min()) if self.ious.size else 0.0

    @property
    def passed(self) -> bool:
        """The masks match float32's (mean IoU at least :data:`PARITY_MIN_IOU`)."""
        return self.ious.size > 0 and self.mean_iou >= PARITY_MIN_IOU

    @property
    def faster(self) -> bool:
        """The reduced encode was at least :data:`MIN_SPEEDUP` times faster than float32's.

        Small models gain nothing (their encode is overhead); the margin keeps
        the workers of one server, which each time it, from deciding apart.
        """
        return self.float32_seconds >= MIN_SPEEDUP * self.seconds

    def __str__(self) -> str:
        return (f"{self.precision} masks against float32's: mean IoU {self.mean_iou:.4f}, min {self.min_iou:.4f} "
                f"over {self.ious.size} masks (at least {PARITY_MIN_IOU} needed); encode {self.seconds:.2f}s "
                f"against {self.float32_seconds:.2f}s")


def parity_scene(seed: int = 20261123):
    """The generated scene reduced precision is judged on: several shapes of varied fills, 600x800."""
    from sam_backend.sam.synthetic import generate_scene

    return generate_scene(np.random.default_rng(seed), (600, 800), num_shapes=(6, 7))


def parity_prompts(scene) -> list[dict]:
    """A click inside and a box around each shape of ``scene``, as an annotator would give them."""
    from sam_backend.sam.synthetic import bounding_box, interior_point

    prompts = []
    for mask in scene.masks:
        prompts.append(dict(points=[interior_point(mask)], labels=[1], multimask=True))
        prompts.append(dict(box=bounding_box(mask)))
    return prompts


def choose_precision(engine, requested: str | None = None) -> str:
    """Set ``engine.precision``: a reduced one only where it is wanted and keeps the masks.

    The candidate comes from ``SAM_PRECISION`` (or ``requested``; see
    :func:`candidate_precision`): bfloat16 on a CPU with AMX by default,
    float32 elsewhere. A reduced candidate is encoded beside float32 on the
    parity scene, and kept only if the masks of a click and a box on each
    shape match float32's at a mean IoU of at least :data:`PARITY_MIN_IOU`
    (``engine.parity`` holds the figures) and, under ``auto``, if its encode
    was at least :data:`MIN_SPEEDUP` times faster. Embeddings from different
    precisions never mix: the embedding store keys carry it.

    Returns:
        The precision now in use.

    Example:
        >>> engine = SamEngine.from_preset("demo")  # doctest: +SKIP
        >>> choose_precision(engine, "bfloat16")  # doctest: +SKIP
        'bfloat16'
    """
    wanted = requested or requested_precision()
    candidate = candidate_precision(engine.device_type, wanted)
    engine.precision, engine.parity = "float32", None
    if candidate == "float32":
        return engine.precision
    if engine.device_type == "cpu" and not cpu_has_amx_bf16():
        logger.warning("%s asked for on a CPU without AMX: slower than float32 there.", candidate)
    try:
        engine.parity = measure_parity(engine, candidate)
    except Exception as exc:  # a precision this device or torch cannot run: float32 it is
        logger.warning("Image encoder stays float32: %s failed (%s: %s).", candidate, type(exc).__name__, exc)
        return engine.precision
    if not engine.parity.passed:
        logger.warning("Image encoder stays float32: %s.", engine.parity)
    elif wanted == "auto" and not engine.parity.faster:
        logger.info("Image encoder stays float32: %s is not enough faster here (%s).", candidate, engine.parity)
    else:
        engine.precision = candidate
        logger.info("Image encoder in %s (%s).", candidate, engine.parity)
    return engine.precision


def measure_parity(engine, precision: str) -> ParityReport:
    """Masks from ``precision``'s embedding of the parity scene against float32's (nothing counted in stats)."""
    from sam_backend.sam.engine import Embedding, validate_prompt
    from sam_backend.sam.synthetic import iou
    from sam_backend.sam.transforms import Frame, preprocess

    scene = parity_scene()
    batch = preprocess(scene.image, engine.input_size)[None]
    frame = Frame.for_image(scene.size, engine.input_size)
    # Each precision's first encode pays one-time costs (kernel selection): not its speed.
    engine.encode_features(batch, "float32")
    features, float32_seconds = _timed_encode(engine, batch, "float32")
    reference = Embedding(features, frame)
    engine.encode_features(batch, precision)
    features, seconds = _timed_encode(engine, batch, precision)
    reduced = Embedding(features, frame)
    ious = []
    for prompt in parity_prompts(scene):
        points, labels, box = validate_prompt(prompt.get("points"), prompt.get("labels"), prompt.get("box"),
                                              scene.size)
        expected = engine.decode_uncounted(reference, points, labels, box, multimask=prompt.get("multimask"))
        got = engine.decode_uncounted(reduced, points, labels, box, multimask=prompt.get("multimask"))
        ious.extend(iou(a, b) for a, b in zip(expected.masks, got.masks))
    return ParityReport(precision, np.array(ious), seconds, float32_seconds)


def _timed_encode(engine, batch: np.ndarray, precision: str, budget: float = 0.3):
    """Features of ``batch`` at ``precision`` and the fastest of as many encodes as fit in ``budget`` seconds.

    One encode for a large model; a small one's 20 ms encodes are timed
    many times, so that every worker of a server times them alike.
    """
    times = []
    while not times or (sum(times) < budget and len(times) < 50):
        started = time.perf_counter()
        features = engine.encode_features(batch, precision)
        times.append(time.perf_counter() - started)
    return features, min(times)
