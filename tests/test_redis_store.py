"""The Redis store against a real redis-server on loopback (Debian's, installed by .ci/run)."""

import logging
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest

from conftest import build_tiny_segmenter, click_at_once, random_image
from sam_backend.embeddings.tiers import EmbeddingTiers
from sam_backend.sam.engine import SamEngine
from sam_backend.errors import StoreError
from sam_backend.embeddings.disk_store import DiskStore
from sam_backend.embeddings.settings import open_store
from sam_backend.embeddings.store import StoredEmbedding, entry_key

redis = pytest.importorskip("redis", reason="the redis client is installed with sam-backend[test]")
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (apt-get install redis-server)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, directory):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.time() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.time() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def engine_on(url, model):
    return EmbeddingTiers(SamEngine(model, preset="tiny"), store=open_store(url=url, required=True))


def test_hosts_share_entries_through_redis(redis_url, tiny_segmenter, rng):
    image = random_image(rng, 90, 200)
    first = engine_on(redis_url, tiny_segmenter)
    assert first.store.tier == "redis"
    before = first.embedding_for("img-1", image)
    other_host = engine_on(redis_url, tiny_segmenter)
    after = other_host.embedding_for("img-1", lambda: pytest.fail("a stored image must not be loaded"))
    assert (first.engine.encoder_calls, other_host.engine.encoder_calls) == (1, 0)
    assert after.frame == before.frame
    assert float((after.features - before.features).abs().max()) == 0.0
    stats = other_host.store.stats()
    assert stats.entries == 1 and stats.bytes > 0


def test_same_keys_and_format_as_the_disk_store(redis_url, tmp_path):
    disk = DiskStore(tmp_path, 1 << 20)
    key = entry_key("ab12cd34ef56ab78", "img-1")
    disk.put(key, StoredEmbedding(np.ones((4, 4, 8), np.float16), (90, 200), (58, 128), 128))
    data = next((tmp_path / "v1").rglob("*.npz")).read_bytes()
    store = open_store(url=redis_url, required=True)
    store.client.set(store.prefix + key, data)  # a disk entry copied into Redis as is
    assert store.get(key).original_size == (90, 200)


def test_a_corrupt_entry_is_recomputed(redis_url, tiny_segmenter, rng, caplog):
    image = random_image(rng, 90, 200)
    first = engine_on(redis_url, tiny_segmenter)
    first.embedding_for("img-1", image)
    (name,) = [k for k in first.store.client.keys("sam:*")]
    first.store.client.set(name, b"not an npz")
    engine = engine_on(redis_url, tiny_segmenter)
    with caplog.at_level(logging.WARNING):
        engine.embedding_for("img-1", image)
    assert engine.engine.encoder_calls == 1 and "Dropping the stored embedding" in caplog.text
    assert engine.store.get(name.decode().split(":", 2)[2]) is not None


def test_concurrent_hosts_encode_one_image_once(redis_url, tiny_segmenter, rng):
    image = random_image(rng, 90, 200)
    engines = [engine_on(redis_url, tiny_segmenter) for _ in range(2)]
    click_at_once(engines, image, 6)
    assert sum(e.engine.encoder_calls for e in engines) == 1
    assert engines[0].store.client.keys("sam:v1:lock:*") == []


def test_a_different_preset_never_hits_the_others_entries(redis_url, tiny_segmenter, rng):
    image = random_image(rng, 90, 200)
    engine_on(redis_url, tiny_segmenter).embedding_for("img-1", image)
    other = engine_on(redis_url, build_tiny_segmenter(seed=1))
    other.embedding_for("img-1", image)
    assert other.engine.encoder_calls == 1 and len(other.store.stats().presets) == 2


def test_an_unreachable_redis_means_memory_only(caplog):
    url = f"redis://127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.WARNING):
        assert open_store(url=url) is None
    assert "Cannot reach Redis" in caplog.text and "memory only" in caplog.text
    with pytest.raises(StoreError, match="Cannot reach Redis"):
        open_store(url=url, required=True)
    with pytest.raises(StoreError, match="not a Redis URL"):
        open_store(url="http://example.com", required=True)


def test_redis_going_away_costs_an_encode_not_the_click(tmp_path, tiny_segmenter, rng, caplog):
    server = RedisServer(tmp_path)
    engine = engine_on(server.url, tiny_segmenter)
    engine.embedding_for("img-1", random_image(rng, 90, 200))
    server.stop()
    with caplog.at_level(logging.WARNING):
        embedding = engine.embedding_for("img-2", random_image(rng, 90, 200))
    assert embedding.frame.original_size == (90, 200) and engine.engine.encoder_calls == 2
    assert "Redis at" in caplog.text


def test_cache_command_with_redis(redis_url, tiny_segmenter, rng, monkeypatch, capsys):
    from sam_backend.commands.cli import main

    engine_on(redis_url, tiny_segmenter).embedding_for("img-1", random_image(rng, 90, 200))
    monkeypatch.setenv("SAM_CACHE_URL", redis_url)
    assert main(["cache", "stats"]) == 0
    assert f"{redis_url} (redis): 1 embedding(s)" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert open_store(url=redis_url, required=True).stats().entries == 0


def test_a_look_ahead_spare_is_written_only_where_redis_evicts_nothing(redis_url):
    store = open_store(url=redis_url, required=True)
    with store.lock("some-key", timeout=0) as held:  # a lock says whether it was taken
        assert held
        with open_store(url=redis_url, required=True).lock("some-key", timeout=0) as other:
            assert not other
    entry = StoredEmbedding(np.ones((64, 64, 32), np.float16), (90, 200), (58, 128), 128)
    assert store.put_spare(entry_key("ab12cd34ef56ab78", "img-1"), entry, protect_seconds=600)  # no maxmemory
    used = int(store.client.info("memory")["used_memory"])
    store.client.config_set("maxmemory", used + 1024)  # less room than one more entry takes
    assert not store.put_spare(entry_key("ab12cd34ef56ab78", "img-2"), entry, protect_seconds=600)
    store.client.config_set("maxmemory", 0)
    assert store.get(entry_key("ab12cd34ef56ab78", "img-2")) is None
    assert store.get(entry_key("ab12cd34ef56ab78", "img-1")) is not None
