"""Exceptions that carry a message meant for the annotator or the operator.

Each class names a kind of failure; the HTTP layer maps kinds to status codes,
so nothing here knows about HTTP.
"""


class SamBackendError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class BadRequestError(SamBackendError):
    """The request itself is malformed (missing fields, wrong types)."""


class PromptError(BadRequestError):
    """The prompt cannot be used: no points and no box, a zero-size box..."""


class ImageError(SamBackendError):
    """The image cannot be used: not an image, corrupt, or too large."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than the configured limit."""


class LabelConfigError(SamBackendError):
    """The project's label config lacks the tags the backend needs."""


class MediaFetchError(SamBackendError):
    """The task's media could not be fetched (unreachable, 404, refused)."""


class MediaTimeoutError(MediaFetchError):
    """Fetching the task's media took too long."""


class MediaRefusedError(MediaFetchError):
    """The task's media URL points where the backend does not fetch from.

    A private, loopback or link-local address not allowed by the operator, a
    ``file://`` or other non-http(s) URL, a local-files path outside the
    document root: refused before anything is fetched.
    """


class MediaTooLargeError(MediaFetchError):
    """The task's media is larger than the download limit (``SAM_MAX_DOWNLOAD_MB``)."""


class PresetLoadError(SamBackendError):
    """A keras-hub preset could not be loaded as a SAM image segmenter."""


class ModelNotReadyError(SamBackendError):
    """The model is still loading, or failed to load."""


class StoreError(SamBackendError):
    """The embedding store cannot be used (not writable, unreachable, misconfigured)."""


class NotConfiguredError(SamBackendError):
    """The request needs something this server was not started with (e.g. a SAM 3 concept preset)."""
