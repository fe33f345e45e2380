"""Optional speed-ups of the SAM image encoder; the backend is correct without any of them.

``sam_backend.sam`` is the model path alone and imports nothing from here.
Everything that makes it faster without changing its masks lives in this
package, each with its own switch (``0``, ``false``, ``off`` or ``no`` turns
it off):

========================== =========================== =====================================================
module                     switch                      what it does
========================== =========================== =====================================================
:mod:`.attention`          ``SAM_FUSED_ATTENTION``     ViTDet attention in one fused call, projections on
                                                       real tokens only, bfloat16-aware linears
:mod:`.attention_kernel`   ``SAM_ATTENTION_KERNEL``    float32 CPU attention with the relative-position bias
                                                       in an AVX-512 C kernel (built at first use)
:mod:`.precision`          ``SAM_PRECISION``           bfloat16 encoder where AMX makes it faster and the
                                                       masks match float32's (``float32`` turns it off)
:mod:`.allocator`          ``SAM_ALLOCATOR``           model commands re-run themselves under tcmalloc
                                                       (``system`` turns it off)
========================== =========================== =====================================================

Two calls reach this package: :func:`accelerate` on a loaded engine (by
``sam_backend.server.loading``), and :func:`~.allocator.ensure_allocator` at
the start of a model command (by ``sam_backend.commands.cli``), since a
process can only change its allocator before it has allocated much.

Example:
    >>> from sam_backend.sam.engine import SamEngine
    >>> engine = SamEngine.from_preset("demo")  # doctest: +SKIP
    >>> accelerate(engine)  # doctest: +SKIP
    ['fused attention (12 layers)', 'precision float32']
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def accelerate(engine) -> list[str]:
    """Apply every enabled acceleration to a loaded :class:`~sam_backend.sam.engine.SamEngine`.

    Patches the image encoder's attention (``SAM_FUSED_ATTENTION``, which
    uses the C kernel where ``SAM_ATTENTION_KERNEL`` allows), then picks the
    encoder's precision (``SAM_PRECISION``; the check encodes a scene both
    ways, so it runs after the patch, on the encoder that will serve).

    Returns:
        What was applied, for logs.
    """
    from sam_backend.accel.attention import fuse_vitdet_attention
    from sam_backend.accel.precision import choose_precision

    applied = []
    fused = fuse_vitdet_attention(engine.model)
    if fused:
        applied.append(f"fused attention ({fused} layers)")
    applied.append(f"precision {choose_precision(engine)}")
    logger.info("Accelerations: %s", ", ".join(applied))
    return applied
