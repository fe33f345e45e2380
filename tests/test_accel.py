"""The accelerations are optional: the model path works without them and gives the same masks with them."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sam_backend.accel.precision import PARITY_MIN_IOU, parity_prompts, parity_scene
from sam_backend.sam.engine import validate_prompt
from sam_backend.sam.synthetic import bounding_box, generate_scene, interior_point, iou

torch = pytest.importorskip("torch")


def _masks(engine, scene) -> list[np.ndarray]:
    """A click inside and a box around each shape: the best mask of each."""
    embedding = engine.encode(scene.image)
    masks = []
    for mask in scene.masks:
        masks.append(engine.decode(embedding, points=[interior_point(mask)], labels=[1]).mask)
        masks.append(engine.decode(embedding, box=bounding_box(mask)).mask)
    return masks


def _parity_masks(engine) -> list[np.ndarray]:
    """Every candidate mask of the prompts the precision check judges bfloat16 on."""
    scene = parity_scene()
    embedding = engine.encode(scene.image)
    masks = []
    for prompt in parity_prompts(scene):
        points, labels, box = validate_prompt(prompt.get("points"), prompt.get("labels"), prompt.get("box"),
                                              scene.size)
        masks.extend(engine.decode(embedding, points, labels, box, multimask=prompt.get("multimask")).masks)
    return masks


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_every_acceleration_off_gives_the_accelerated_masks(precision, monkeypatch):
    """The demo preset plain (no accel call) against accelerate(): fused attention, and bfloat16 where asked."""
    from sam_backend.accel import accelerate
    from sam_backend.accel.attention import _PATCH_MARK
    from sam_backend.sam.engine import SamEngine

    scene = generate_scene(np.random.default_rng(7), (480, 720), num_shapes=(5, 6))
    plain = SamEngine.from_preset("demo")
    monkeypatch.setenv("SAM_PRECISION", precision)
    fast = SamEngine.from_preset("demo")
    applied = accelerate(fast)

    layers = [layer for layer in fast.model._flatten_layers() if getattr(layer, _PATCH_MARK, False)]
    assert layers, "accelerate() patched no attention layer: the comparison would compare nothing"
    assert not any(getattr(layer, _PATCH_MARK, False) for layer in plain.model._flatten_layers())
    assert f"precision {fast.precision}" in applied
    if precision == "bfloat16":
        assert fast.precision == "bfloat16", "the demo's bfloat16 masks failed the parity check"

    if precision == "float32":
        # The same arithmetic, reordered: every mask of another scene.
        ious = np.array([iou(a, b) for a, b in zip(_masks(plain, scene), _masks(fast, scene))])
        assert len(ious) == 2 * len(scene.masks)
        assert ious.min() >= 0.99, ious
    else:
        # bfloat16 embeddings differ by about 1 %, so a lone click near a part boundary may
        # pick SAM's next candidate: the plain float32 model against the fused bfloat16 one,
        # on the bar that the server's check holds bfloat16 to (fused float32 against it).
        ious = np.array([iou(a, b) for a, b in zip(_parity_masks(plain), _parity_masks(fast))])
        assert ious.size >= 12 and ious.mean() >= PARITY_MIN_IOU, ious


def test_the_model_path_runs_with_the_accel_package_gone(tmp_path):
    """As if sam_backend/accel were deleted: the engine loads the demo, encodes and decodes."""
    script = textwrap.dedent("""
        import importlib.abc, sys

        class Gone(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "sam_backend.accel" or name.startswith("sam_backend.accel."):
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None

        sys.meta_path.insert(0, Gone())
        import numpy as np
        from sam_backend.sam.engine import SamEngine

        engine = SamEngine.from_preset("demo")
        engine.warm_up()
        image = np.zeros((300, 400, 3), np.uint8)
        image[100:200, 150:260] = 220
        mask = engine.decode(engine.encode(image), points=[[200, 150]], labels=[1]).mask
        assert mask.shape == (300, 400) and mask[150, 200], mask.sum()
        assert not [m for m in sys.modules if m.startswith("sam_backend.accel")]
        print("ok", int(mask.sum()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
