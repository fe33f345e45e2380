"""Fetching task media through label-studio-sdk, with credentials, timeouts and limits.

Where media may come from (no private addresses, no ``file://``, local-files
paths inside their document root) and how much of it is read are decided by
:mod:`sam_backend.labelstudio.media_safety`; this module picks the URL forms
Label Studio serves itself and hands the download to label-studio-sdk.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import tempfile
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import requests

from sam_backend.errors import MediaFetchError, MediaRefusedError, MediaTimeoutError, MediaTooLargeError
from sam_backend.labelstudio.media_safety import MediaPolicy, MediaSession, max_download_bytes

logger = logging.getLogger(__name__)

#: Seconds to wait for media; ``SAM_MEDIA_TIMEOUT`` overrides it.
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credentials:
    """Where Label Studio is and how to authenticate to it."""

    hostname: str | None = None
    token: str | None = None

    @classmethod
    def from_env(cls) -> "Credentials":
        """``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` (label-studio-ml's names)."""
        return cls(
            hostname=(os.environ.get("LABEL_STUDIO_URL") or os.environ.get("LABEL_STUDIO_HOST") or None),
            token=(os.environ.get("LABEL_STUDIO_API_KEY") or os.environ.get("LABEL_STUDIO_ACCESS_TOKEN") or None),
        )


class MediaFetcher:
    """Resolve a task's image URL to a local file with ``get_local_path``.

    Handles Label Studio uploads, local-files storage, cloud storage URIs
    (through Label Studio's presign endpoint) and plain http(s) URLs.
    Personal access tokens (JWT refresh tokens) are exchanged for short-lived
    access tokens, which is what Label Studio accepts as ``Bearer``.

    Media is only fetched from where ``policy`` allows (the Label Studio host
    of the credentials is always allowed), at most ``max_bytes`` of it, and a
    local-files path is only read inside its document root.

    Args:
        cache_dir: where downloads are kept (default: ``MODEL_DIR/media`` or a temp dir).
        timeout: seconds per HTTP request.
        policy: where media may come from (default: ``SAM_MEDIA_ALLOWED_HOSTS``,
            ``SAM_MEDIA_ALLOW_PRIVATE``).
        max_bytes: the largest download (default: ``SAM_MAX_DOWNLOAD_MB``, 100 MB).

    Example:
        >>> fetcher = MediaFetcher()
        >>> path = fetcher.fetch("/data/upload/1/cat.jpg", task_id=7,
        ...     credentials=Credentials("http://localhost:8080", "<token>"))  # doctest: +SKIP
    """

    def __init__(self, cache_dir: str | None = None, timeout: float | None = None,
                 policy: MediaPolicy | None = None, max_bytes: int | None = None):
        base = cache_dir or os.path.join(os.environ.get("MODEL_DIR") or tempfile.gettempdir(), "sam-backend-media")
        self.cache_dir = base
        os.makedirs(self.cache_dir, exist_ok=True)
        self.timeout = timeout or float(os.environ.get("SAM_MEDIA_TIMEOUT") or DEFAULT_TIMEOUT)
        self.policy = policy if policy is not None else MediaPolicy.from_env()
        self.max_bytes = max_bytes if max_bytes is not None else max_download_bytes()
        self._access_tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def fetch(self, url: str, task_id: int | None = None, credentials: Credentials | None = None) -> str:
        """A local path for ``url``.

        Raises:
            MediaRefusedError: the URL is not http(s) nor a Label Studio path, its
                host (or a redirect's) is not allowed, or a local-files path
                leaves its document root.
            MediaTooLargeError: the download is larger than ``max_bytes``.
            MediaTimeoutError: Label Studio or the media host did not answer in time.
            MediaFetchError: unreachable, refused, 404, or no credentials for a
                Label Studio URL.
        """
        from label_studio_sdk._extensions.label_studio_tools.core.utils.io import (
            get_local_path,
            http_session,
            resolve_local_storage_file,
        )

        if not isinstance(url, str) or not url:
            raise MediaFetchError(f"Task {task_id}: the image URL is empty.")
        credentials = credentials if credentials is not None else Credentials()
        policy = self.policy.for_labelstudio(credentials.hostname)
        session = MediaSession(policy, self.timeout, self.max_bytes)
        try:
            if _is_local_storage_url(url):
                # get_local_path would copy a Local Storage file into the media
                # cache once and return that copy ever after, hiding later edits
                # of the file; read the file itself when it is on this host.
                local = _local_storage_file(url, resolve_local_storage_file)
                if local:
                    return local
            elif not _is_labelstudio_path(url):
                # file://, bare paths...: refused before the SDK sees them. Hosts are
                # checked by the session when it connects, so a cached image costs no DNS lookup.
                policy.check_form(url)
            token = self._bearer_token(credentials)
            with http_session(session), self._download_lock(url):
                return get_local_path(
                    url,
                    cache_dir=self.cache_dir,
                    hostname=credentials.hostname,
                    access_token=token,
                    task_id=task_id,
                )
        except (MediaRefusedError, MediaTooLargeError) as exc:
            raise type(exc)(f"Task {task_id}: {exc}") from None
        except requests.exceptions.TooManyRedirects:
            raise MediaFetchError(
                f"Task {task_id}: fetching {url} was redirected more than {session.max_redirects} times."
            ) from None
        except requests.exceptions.Timeout:
            raise MediaTimeoutError(
                f"Task {task_id}: fetching {url} took longer than {self.timeout:g}s (SAM_MEDIA_TIMEOUT)."
            ) from None
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            hint = {
                401: " Check LABEL_STUDIO_API_KEY: Label Studio 1.23 refuses legacy tokens by default; "
                "use a personal access token.",
                403: " The token may not have access to this project.",
                404: " The file is gone from Label Studio or its storage.",
            }.get(status, "")
            raise MediaFetchError(f"Task {task_id}: fetching {url} answered HTTP {status}.{hint}") from None
        except requests.exceptions.RequestException as exc:
            raise MediaFetchError(f"Task {task_id}: cannot reach the host of {url} ({type(exc).__name__}).") from None
        except FileNotFoundError as exc:
            raise MediaFetchError(
                f"Task {task_id}: cannot fetch {url}: {exc} Set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
                "(a personal access token) so the backend can download task media."
            ) from None
        except ValueError as exc:
            raise MediaFetchError(f"Task {task_id}: cannot fetch {url}: {exc}") from None
        finally:
            session.close()

    @contextlib.contextmanager
    def _download_lock(self, url: str):
        """One download of ``url`` at a time across the workers sharing the media cache.

        label-studio-sdk writes straight into its cached file and serves any
        file that exists: without the lock a second worker can read a file
        the first is still writing, and reject the image as truncated.
        """
        locks = os.path.join(self.cache_dir, ".locks")
        os.makedirs(locks, exist_ok=True)
        path = os.path.join(locks, hashlib.sha256(url.encode("utf-8")).hexdigest()[:32] + ".lock")
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _bearer_token(self, credentials: Credentials) -> str | None:
        """The token to send: a fresh access token for a personal access token, else as given."""
        token, hostname = credentials.token, credentials.hostname
        claims = _jwt_claims(token) if token else None
        if not claims or claims.get("token_type") != "refresh" or not hostname:
            return token
        key = (hostname, token)
        with self._lock:
            cached = self._access_tokens.get(key)
            if cached and cached[1] > time.time() + 30:
                return cached[0]
        try:
            response = requests.post(
                hostname.rstrip("/") + "/api/token/refresh/", json={"refresh": token}, timeout=self.timeout
            )
        except requests.exceptions.Timeout:
            raise MediaTimeoutError(f"Label Studio at {hostname} did not answer the token refresh in time.") from None
        except requests.exceptions.RequestException as exc:
            raise MediaFetchError(f"Cannot reach Label Studio at {hostname} ({type(exc).__name__}).") from None
        if response.status_code != 200:
            raise MediaFetchError(
                f"Label Studio at {hostname} refused the personal access token (HTTP {response.status_code}); "
                "create a new one in Account & Settings and set LABEL_STUDIO_API_KEY."
            )
        access = response.json().get("access")
        expires = (_jwt_claims(access) or {}).get("exp", time.time() + 60)
        with self._lock:
            self._access_tokens[key] = (access, float(expires))
        return access


def _jwt_claims(token: str) -> dict | None:
    """The unverified payload of a JWT, or None if ``token`` is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def _is_local_storage_url(url: str) -> bool:
    """Label Studio's local-files form, as label-studio-sdk recognises it."""
    return url.startswith("/data/") and "?d=" in url


def _is_labelstudio_path(url: str) -> bool:
    """A form label-studio-sdk fetches from the Label Studio host (which the policy allows)."""
    from label_studio_sdk._extensions.label_studio_tools.core.utils.io import is_cloud_storage_uri

    return (
        url.startswith(("upload", "/upload", "/data/upload", "/storage-data/uploaded", "storage-data/uploaded"))
        or _is_local_storage_url(url)
        or is_cloud_storage_uri(url)
    )


def _local_storage_file(url: str, resolve) -> str | None:
    """The file a local-files URL names on this host, or None to fetch it from Label Studio.

    Raises:
        MediaRefusedError: the path leaves the document root: ``..`` (also
            URL-encoded), or a symlink out of it. An absolute path is read
            relative to the root, as Label Studio's own view does.
    """
    from label_studio_sdk._extensions.label_studio_tools.core.utils import io as sdk_io

    # The ?d= value as Label Studio reads it: decoded once, the last one wins.
    values = parse_qs(urlsplit(url).query, keep_blank_values=True).get("d") or [""]
    normal = posixpath.normpath(values[-1])
    if normal == ".." or normal.startswith("../"):
        raise MediaRefusedError(f"Refused to read {url}: the local-files path leaves the document root.")
    try:
        local = resolve(url)
    except ValueError:  # label-studio-sdk's own check of the same
        raise MediaRefusedError(f"Refused to read {url}: the local-files path leaves the document root.") from None
    if not local or not os.path.isfile(local):
        return None
    root = sdk_io.LOCAL_FILES_DOCUMENT_ROOT
    if root:
        real_root = os.path.realpath(root)
        if os.path.commonpath([os.path.realpath(local), real_root]) != real_root:
            raise MediaRefusedError(
                f"Refused to read {url}: it is a link to a file outside LOCAL_FILES_DOCUMENT_ROOT ({root})."
            )
    return local
