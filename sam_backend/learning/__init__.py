"""Learning from a project's annotations: a per-project decoder that only ever gets better.

Holds the prompts SAM's training simulates from a true mask (:mod:`.prompts`),
SAM's loss (:mod:`.objective`), the fine-tuning of the prompt encoder and
mask decoder on cached embeddings and the held-out score (:mod:`.tuning`),
a project's versions on disk (:mod:`.versions`), which version answers a
project (:mod:`.serving`), and one training from Label Studio's annotations
to a gated version (:mod:`.project`). The image encoder is never trained.

May import: ``sam_backend.sam``, ``sam_backend.embeddings``,
``sam_backend.labelstudio``, ``sam_backend.errors``. Never the server or HTTP.
"""
