"""The model and nothing else: SAM from a keras-hub preset.

Holds preset loading (:mod:`.presets`), the engine that encodes an image once
and decodes prompts against it (:mod:`.engine`), Meta's pre- and
post-processing (:mod:`.transforms`), image decoding (:mod:`.images`),
automatic masks (:mod:`.automask`), the architectures the demo preset and the
tests build (:mod:`.architectures`), the generated shapes they train and
test on (:mod:`.synthetic`). What makes the image encoder faster without
changing its masks lives apart, in :mod:`sam_backend.accel`, which patches a
loaded model; nothing here imports it.

May import: ``sam_backend.errors``, keras, keras-hub, torch, numpy, Pillow.
Never Label Studio, HTTP or storage: those live above it.
"""
