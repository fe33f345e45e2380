"""Meta's ``segment_anything`` importable beside this torch, for the reference tests and benchmarks.

``segment_anything`` imports torchvision, which has no CPU build that matches
this torch; only ``resize`` and ``to_pil_image`` of it are used on the paths
compared here, so when torchvision cannot be imported they are provided with the
behaviour torchvision documents for PIL images (Pillow bilinear resize).
"""

import sys
import types

import numpy as np
from PIL import Image


def install_torchvision_stand_in() -> None:
    """Provide the two torchvision functions ``segment_anything`` uses, unless torchvision imports."""
    try:
        import torchvision.transforms.functional  # noqa: F401
        return
    except Exception:
        pass
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.to_pil_image = lambda array: Image.fromarray(np.asarray(array))
    functional.resize = lambda image, size: image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    boxes = types.ModuleType("torchvision.ops.boxes")
    boxes.batched_nms = boxes.box_area = None  # automatic mask generator only
    modules = {
        "torchvision": types.ModuleType("torchvision"),
        "torchvision.transforms": types.ModuleType("torchvision.transforms"),
        "torchvision.transforms.functional": functional,
        "torchvision.ops": types.ModuleType("torchvision.ops"),
        "torchvision.ops.boxes": boxes,
    }
    for name in list(sys.modules):
        if name == "torchvision" or name.startswith("torchvision."):
            del sys.modules[name]
    sys.modules.update(modules)
