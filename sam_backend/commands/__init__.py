"""The ``sam-backend`` command line: serve, precompute, preannotate, train, versions, cache.

:mod:`.cli` parses the command line (and starts the commands that run the
model again under tcmalloc, :mod:`sam_backend.accel.allocator`). Whole
projects: :mod:`.runner` walks a project's tasks through a job,
:mod:`.precompute` and :mod:`.preannotate` are the two jobs, and the model work
runs in this process or, with ``--ray``, on a Ray cluster
(:mod:`.ray_executor`, the optional ``[ray]`` extra). :mod:`.train` trains a
project's decoder from its annotations and lists or pins its versions.

May import every other package; nothing imports it but ``sam_backend.__main__``.
"""
