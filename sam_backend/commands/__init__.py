"""The ``sam-backend`` command line: serve, precompute, preannotate, cache.

:mod:`.cli` parses the command line (and starts the commands that run the
model again under tcmalloc, :mod:`sam_backend.allocator`); :mod:`.precompute`
and :mod:`.preannotate` run whole projects through label-studio-sdk, on this
machine or, with ``--ray``, on a Ray cluster (:mod:`.ray_pipeline`, the
optional ``[ray]`` extra).

May import every other package; nothing imports it but ``sam_backend.__main__``.
"""
