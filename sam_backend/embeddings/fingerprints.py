"""Identities for the embedding store: which model made an embedding, and of which image.

An embedding is only valid for the exact weights that computed it and the
exact bytes of the image, so both go into the store's keys:

- a *preset fingerprint* hashes a preset directory's config and weight files,
  or a model object's config and weights;
- an *image identity* is the task's URL plus a digest of the image file's
  content, so that a replaced file never meets a stale embedding.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

#: Bytes read at a time when hashing files.
_CHUNK = 1 << 20

#: Preset files that describe the model (``metadata.json`` is left out: it
#: holds the save date, which changes nothing about the embeddings).
_MODEL_FILE_SUFFIXES = (".json", ".h5", ".keras", ".safetensors")
_IGNORED_FILES = ("metadata.json",)


def _hasher():
    return hashlib.blake2b(digest_size=20)


def fingerprint_preset_dir(path: str | os.PathLike) -> str:
    """Hash of a keras-hub preset directory's config and weight files.

    Example:
        >>> fingerprint_preset_dir("sam_backend/presets/demo")  # doctest: +SKIP
        '3f0c...'
    """
    root = Path(path)
    files = sorted(
        p for p in root.iterdir()
        if p.is_file() and p.name.endswith(_MODEL_FILE_SUFFIXES) and p.name not in _IGNORED_FILES
    )
    if not files:
        raise ValueError(f"{root} holds no config or weight files to fingerprint.")
    digest = _hasher()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as fp:
            for chunk in iter(lambda: fp.read(_CHUNK), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def fingerprint_model(model) -> str:
    """Hash of a keras model's config and weight values.

    Weight names are left out on purpose: keras numbers layers per process
    (``dense_1``...), so the same weights could otherwise hash differently.

    Example:
        >>> fingerprint_model(segmenter)  # doctest: +SKIP
        '9a41...'
    """
    import keras

    digest = _hasher()
    digest.update(json.dumps(model.get_config(), sort_keys=True, default=repr).encode())
    for weight in model.weights:
        value = keras.ops.convert_to_numpy(weight)
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


class _DigestMemo:
    """Content digests of files, remembered while the file's stat is unchanged.

    A click re-reads the same file many times; hashing it once per change is
    enough, and the stat (inode, size, mtime in ns) tells when it changed.
    """

    def __init__(self, capacity: int = 4096):
        self._entries: OrderedDict[tuple, str] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def digest(self, path: str | os.PathLike) -> str:
        stat = os.stat(path)
        key = (os.fspath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        digest = _hasher()
        with open(path, "rb") as fp:
            for chunk in iter(lambda: fp.read(_CHUNK), b""):
                digest.update(chunk)
        value = digest.hexdigest()
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        return value


_memo = _DigestMemo()


def file_digest(path: str | os.PathLike) -> str:
    """A digest of the file's content (computed once per change of the file).

    Raises:
        OSError: the file cannot be read.
    """
    return _memo.digest(path)


def image_identity(url: str, path: str | os.PathLike) -> str:
    """The identity of a task image: its URL and a digest of the fetched file.

    The content digest (rather than size and mtime) keeps identities equal on
    every host, so a store filled on one machine serves another; it is only
    recomputed when the file's size or mtime changes.

    Example:
        >>> image_identity("/data/upload/1/cat.jpg", "/tmp/media/cat.jpg")  # doctest: +SKIP
        '/data/upload/1/cat.jpg|5be8...'
    """
    return f"{url}|{file_digest(path)}"
