"""Shared fixtures: a tiny random SAM of keras-hub's own architecture."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
# The same precision on every machine (auto would pick bfloat16 on a CPU with AMX only);
# tests/test_precision.py turns reduced precision on where it tests it.
os.environ.setdefault("SAM_PRECISION", "float32")

import logging

import numpy as np
import pytest

import sam_backend  # noqa: F401  (environment before keras)

TINY_INPUT = 128


def build_tiny_segmenter(input_size: int = TINY_INPUT, seed: int = 0):
    """A randomly initialised SAMImageSegmenter small enough for unit tests."""
    from sam_backend.sam.architectures import SamArchitecture, build_sam

    tiny = SamArchitecture(
        input_size=input_size, encoder_width=16, encoder_depth=2, encoder_heads=2, encoder_mlp=32,
        window_size=4, global_layers=(1,), embed_dim=8, decoder_heads=2, decoder_mlp=16,
    )
    return build_sam(tiny, seed)


@pytest.fixture(autouse=True)
def _keep_log_levels():
    """The CLI's logging set-up (``--log-level``) must not silence later tests' ``caplog``."""
    logger = logging.getLogger("sam_backend")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.fixture(autouse=True)
def _versions_dir(tmp_path_factory, monkeypatch):
    """Trained decoder versions go to a directory of the test's own, never the user's."""
    monkeypatch.setenv("SAM_VERSIONS_DIR", str(tmp_path_factory.mktemp("versions")))


@pytest.fixture(scope="session")
def tiny_segmenter():
    return build_tiny_segmenter()


@pytest.fixture(scope="session")
def tiny_preset_dir(tmp_path_factory, tiny_segmenter):
    """The tiny model saved as a local keras-hub preset directory."""
    path = tmp_path_factory.mktemp("presets") / "tiny_sam"
    tiny_segmenter.save_to_preset(str(path))
    return path


@pytest.fixture()
def engine(tiny_segmenter):
    from sam_backend.sam.engine import SamEngine

    return SamEngine(tiny_segmenter, preset="tiny")


@pytest.fixture()
def rng():
    return np.random.default_rng(1234)


def random_image(rng, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture()
def media(tmp_path, monkeypatch):
    """A loopback media server; loopback media is refused by default, so it is allowed here."""
    from media_server import MediaServer

    monkeypatch.setenv("SAM_MEDIA_ALLOWED_HOSTS", "127.0.0.1")
    root = tmp_path / "media"
    root.mkdir()
    server = MediaServer(root)
    yield server
    server.close()


def click_at_once(workers, image, clicks: int, key: str = "img-1") -> None:
    """``clicks`` threads ask ``workers`` (round robin) for one image's embedding at the same moment.

    ``workers`` are :class:`EmbeddingTiers`; each one's encoder is slowed
    down so that the requests really overlap.
    """
    import threading
    import time

    for tiers in workers:
        real = tiers.engine._encoder
        tiers.engine._encoder = lambda x, real=real: time.sleep(0.5) or real(x)
    start = threading.Barrier(clicks)

    def click(tiers):
        start.wait(30)
        tiers.embedding_for(key, image)

    threads = [threading.Thread(target=click, args=(workers[i % len(workers)],)) for i in range(clicks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


@pytest.fixture()
def redis_url(tmp_path):
    """A real redis-server on loopback for one test (Debian's, which .ci/run installs); skipped without one."""
    import shutil

    pytest.importorskip("redis", reason="the redis client is installed with sam-backend[test]")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    from test_redis_store import RedisServer

    server = RedisServer(tmp_path)
    yield server.url
    server.stop()
