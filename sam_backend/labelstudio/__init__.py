"""Label Studio's formats and API, without tensors.

Holds the label config (:mod:`.labelconfig`), the translation between Label
Studio regions and SAM prompts and back to brush results (:mod:`.regions`),
masks as polygon results (:mod:`.polygons`), the choice between brush and
polygons (:mod:`.output`), task media fetching (:mod:`.media`, and where it
may fetch from: :mod:`.media_safety`) and the API client used for late
predictions and the commands (:mod:`.api`).

May import: ``sam_backend.errors``, label-studio-sdk, numpy, OpenCV (which
label-studio-sdk installs), requests and its urllib3.
Never ``sam_backend.sam`` or ``sam_backend.embeddings``: prompts and masks
cross this boundary as plain numpy arrays.
"""
