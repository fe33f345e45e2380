"""The ``sam-backend`` command line: serve, precompute, preannotate, cache.

:mod:`.cli` parses the command line; :mod:`.precompute` and
:mod:`.preannotate` run whole projects through label-studio-sdk;
:mod:`.allocator` starts the commands that run the model again under tcmalloc.

May import every other package; nothing imports it but the entry points:
``sam_backend.__main__``, and ``sam_backend.wsgi`` for :mod:`.allocator`'s log line.
"""
