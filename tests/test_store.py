"""The persistent embedding store: on its own, behind the engine, and between processes."""

import logging
import multiprocessing
import os
import threading
import time

import numpy as np
import pytest

from conftest import build_tiny_segmenter, click_at_once, random_image
from sam_backend.embeddings.tiers import EmbeddingTiers
from sam_backend.sam.engine import SamEngine
from sam_backend.errors import StoreError
from sam_backend.embeddings.fingerprints import fingerprint_model, fingerprint_preset_dir, image_identity
from sam_backend.embeddings.disk_store import DiskStore
from sam_backend.embeddings.settings import open_store
from sam_backend.embeddings.store import StoredEmbedding, decode_entry, encode_entry, entry_key

FP = "ab12cd34ef56ab78"


def entry(seed=0, shape=(8, 8, 8)):
    features = np.random.default_rng(seed).normal(size=shape).astype(np.float16)
    return StoredEmbedding(features, (90, 200), (58, 128), 128)


def key(name):
    return entry_key(FP, name)


def entry_files(root):
    return sorted(p for p in (root / "v1").rglob("*") if p.is_file())


# ------------------------------------------------------------------ disk store


def test_round_trip_and_no_temp_files_left(tmp_path):
    store = DiskStore(tmp_path, 1 << 20)
    assert store.get(key("a")) is None
    assert store.put(key("a"), entry())
    back = store.get(key("a"))
    np.testing.assert_array_equal(back.features, entry().features)
    assert (back.original_size, back.resized_size, back.input_size) == ((90, 200), (58, 128), 128)
    assert [p.suffix for p in entry_files(tmp_path)] == [".npz"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "wrong-dtype"])
def test_an_unreadable_entry_is_dropped_not_served(tmp_path, caplog, damage):
    store = DiskStore(tmp_path, 1 << 20)
    store.put(key("a"), entry())
    (path,) = entry_files(tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(data[:100] + bytes(len(data) - 100))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        bad = StoredEmbedding(entry().features.astype(np.float32), (90, 200), (58, 128), 128)
        np.savez(path.open("wb"), **{k: v for k, v in np.load(_npz_of(bad)).items()})
    with caplog.at_level(logging.WARNING):
        assert store.get(key("a")) is None
    assert "Dropping the stored embedding" in caplog.text
    assert entry_files(tmp_path) == []


def _npz_of(stored):
    import io

    buffer = io.BytesIO()
    np.savez(buffer, version=np.int32(1), features=stored.features, original_size=np.array(stored.original_size),
             resized_size=np.array(stored.resized_size), input_size=np.int32(stored.input_size))
    buffer.seek(0)
    return buffer


def test_budget_evicts_the_least_recently_used_entries(tmp_path):
    size = len(encode_entry(entry()))
    store = DiskStore(tmp_path, int(2.5 * size))
    for i, name in enumerate("abc"):
        store.put(key(name), entry())
        past = time.time() - 100 + i  # distinct mtimes, oldest first
        os.utime(store._path(key(name)), (past, past))
    # Three entries do not fit in 2.5: the oldest ("a") went at the third write.
    assert store.get(key("a")) is None
    assert store.get(key("b")) is not None  # reading "b" makes it the most recent
    store.put(key("d"), entry())
    assert store.get(key("c")) is None and store.get(key("b")) is not None and store.get(key("d")) is not None
    assert store.stats().bytes <= 2.5 * size


def test_entries_written_by_another_process_count_against_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr("sam_backend.embeddings.disk_store.RESCAN_SECONDS", 0.0)  # as if each write came 10 s later
    size = len(encode_entry(entry()))
    mine, other = DiskStore(tmp_path, int(2.5 * size)), DiskStore(tmp_path, int(2.5 * size))
    mine.put(key("a"), entry())
    other.put(key("b"), entry())
    other.put(key("c"), entry())
    mine.put(key("d"), entry())
    assert mine.stats().entries == 2


def test_an_entry_larger_than_the_budget_is_not_stored(tmp_path):
    store = DiskStore(tmp_path, 100)
    assert not store.put(key("a"), entry())
    assert store.get(key("a")) is None


def test_stale_temp_files_of_crashed_writers_are_removed(tmp_path):
    store = DiskStore(tmp_path, 1 << 20)
    store.put(key("a"), entry())
    (path,) = entry_files(tmp_path)
    fresh, stale = path.parent / ".x.fresh.tmp", path.parent / ".x.stale.tmp"
    fresh.write_bytes(b"partial")
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200,) * 2)
    assert store.stats().entries == 1  # temp files are never entries
    assert fresh.exists() and not stale.exists()


def test_stats_and_clear(tmp_path):
    store = DiskStore(tmp_path, 1 << 20)
    store.put(key("a"), entry())
    store.put(entry_key("ff00ff00ff00ff00", "b"), entry())
    stats = store.stats()
    assert stats.entries == 2 and stats.bytes > 0 and len(stats.presets) == 2
    assert store.clear() == 2
    assert store.stats().entries == 0 and store.get(key("a")) is None
    assert store.put(key("a"), entry())  # usable after clearing


def test_keys_are_checked():
    with pytest.raises(ValueError):
        DiskStore.__new__(DiskStore)._path("../../etc/passwd")


def test_decode_refuses_other_versions():
    from sam_backend.embeddings.store import CorruptEntryError

    data = encode_entry(entry())
    assert decode_entry(data).input_size == 128
    with pytest.raises(CorruptEntryError):
        decode_entry(b"PK\x03\x04 not really a zip")


def test_unwritable_directory_degrades_to_memory_only(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        assert open_store(cache_dir=str(blocker / "store"), budget_mb=10) is None
    assert "not writable" in caplog.text and "memory only" in caplog.text
    with pytest.raises(StoreError, match="not writable"):
        open_store(cache_dir=str(blocker / "store"), budget_mb=10, required=True)


def test_store_settings_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SAM_CACHE_URL", raising=False)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.delenv("SAM_CACHE_DIR", raising=False)
    monkeypatch.setenv("SAM_DISK_CACHE_MB", "5")
    store = open_store()
    assert store.location == str(tmp_path / "model" / "sam-backend-embeddings")
    assert store.budget_bytes == 5 * 1024 * 1024
    monkeypatch.setenv("SAM_CACHE_DIR", str(tmp_path / "explicit"))
    assert open_store().location == str(tmp_path / "explicit")
    monkeypatch.setenv("SAM_DISK_CACHE_MB", "0")
    assert open_store() is None
    monkeypatch.setenv("SAM_DISK_CACHE_MB", "lots")
    with pytest.raises(StoreError, match="SAM_DISK_CACHE_MB"):
        open_store()


def _compute_once_in_a_process(root, barrier, results):
    """A worker process: wait for the others, then compute the shared entry unless stored."""
    store = DiskStore(root, 1 << 20)
    k = entry_key(FP, "shared")
    barrier.wait(60)
    computed = 0
    if store.get(k) is None:
        with store.lock(k):
            if store.get(k) is None:
                time.sleep(1.0)  # a slow encode, so that the others really wait
                store.put(k, entry())
                computed = 1
    results.put(computed)


def test_the_lock_makes_processes_compute_an_entry_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    workers = [context.Process(target=_compute_once_in_a_process, args=(str(tmp_path), barrier, results))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    counts = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert sorted(counts) == [0, 0, 1]
    assert list((tmp_path / "locks").iterdir()) == []  # lock files do not pile up


def test_a_lock_held_too_long_is_given_up(tmp_path, caplog):
    store = DiskStore(tmp_path, 1 << 20)
    held = threading.Event()
    release = threading.Event()

    def holder():
        with store.lock(key("a")):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    with caplog.at_level(logging.WARNING):
        started = time.monotonic()
        with store.lock(key("a"), timeout=0.3):
            pass
    assert 0.3 <= time.monotonic() - started < 5 and "encoding it here" in caplog.text
    release.set()
    thread.join()


# ---------------------------------------------------------------- fingerprints


def test_fingerprints_tell_models_apart(tiny_segmenter, tiny_preset_dir, tmp_path):
    assert fingerprint_model(tiny_segmenter) == fingerprint_model(tiny_segmenter)
    assert fingerprint_model(tiny_segmenter) != fingerprint_model(build_tiny_segmenter(seed=1))
    assert fingerprint_preset_dir(tiny_preset_dir) == fingerprint_preset_dir(tiny_preset_dir)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_preset_dir, copy)
    (copy / "metadata.json").write_text("{}")  # the save date is not the model
    assert fingerprint_preset_dir(copy) == fingerprint_preset_dir(tiny_preset_dir)
    weights = copy / "model.weights.h5"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert fingerprint_preset_dir(copy) != fingerprint_preset_dir(tiny_preset_dir)


def test_image_identity_follows_the_content(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(b"first")
    first = image_identity("/data/upload/1/img.png", path)
    assert first == image_identity("/data/upload/1/img.png", path)
    assert first.startswith("/data/upload/1/img.png|")
    path.write_bytes(b"other")  # same size, new content
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
    assert image_identity("/data/upload/1/img.png", path) != first
    assert image_identity("/data/upload/2/img.png", path) != image_identity("/data/upload/1/img.png", path)


# --------------------------------------------------------- behind the engine


@pytest.fixture()
def counted(tiny_segmenter):
    """Embedding tiers of the tiny model on a store; each engine counts its encoder calls."""

    def make(root, model=None, **kwargs):
        return EmbeddingTiers(SamEngine(model or tiny_segmenter, preset="tiny"), store=DiskStore(root, 1 << 30), **kwargs)

    return make


def test_embeddings_survive_a_restart(counted, tmp_path, rng):
    image = random_image(rng, 90, 200)
    first = counted(tmp_path)
    before = first.embedding_for("img-1", image)
    first_click = first.engine.decode(before, points=[[50, 45]], labels=[1])

    restarted = counted(tmp_path)  # a new process: empty memory, same directory
    after = restarted.embedding_for("img-1", lambda: pytest.fail("a stored image must not even be loaded"))
    assert first.engine.encoder_calls == 1 and restarted.engine.encoder_calls == 0
    assert after.frame == before.frame
    click = restarted.engine.decode(after, points=[[50, 45]], labels=[1])
    # The first click is served what the store keeps (float16), so every tier gives the same mask.
    np.testing.assert_array_equal(click.mask, first_click.mask)
    np.testing.assert_array_equal(click.scores, first_click.scores)


def test_a_different_preset_never_hits_the_others_entries(counted, tmp_path, rng):
    image = random_image(rng, 90, 200)
    counted(tmp_path).embedding_for("img-1", image)
    other = counted(tmp_path, model=build_tiny_segmenter(seed=1))
    other.embedding_for("img-1", image)
    assert other.engine.encoder_calls == 1
    assert len(DiskStore(tmp_path, 1 << 30).stats().presets) == 2
    named = counted(tmp_path, fingerprint="0123456789abcdef")  # e.g. another preset directory
    named.embedding_for("img-1", image)
    assert named.engine.encoder_calls == 1


def test_a_corrupt_entry_is_recomputed(counted, tmp_path, rng, caplog):
    image = random_image(rng, 90, 200)
    counted(tmp_path).embedding_for("img-1", image)
    (path,) = entry_files(tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    engine = counted(tmp_path)
    with caplog.at_level(logging.WARNING):
        engine.embedding_for("img-1", image)
    assert engine.engine.encoder_calls == 1 and "Dropping the stored embedding" in caplog.text
    assert decode_entry(path.read_bytes()).original_size == (90, 200)  # rewritten whole


def test_an_entry_that_does_not_fit_the_model_is_recomputed(counted, tmp_path, rng, caplog):
    engine = counted(tmp_path)
    k = entry_key(engine.fingerprint, "img-1")
    engine.store.put(k, StoredEmbedding(np.zeros((3, 3, 8), np.float16), (90, 200), (58, 128), 128))
    with caplog.at_level(logging.WARNING):
        embedding = engine.embedding_for("img-1", random_image(rng, 90, 200))
    assert engine.engine.encoder_calls == 1 and "do not fit this model" in caplog.text
    assert tuple(embedding.features.shape[1:3]) == engine.engine.embedding_size


def test_concurrent_requests_for_one_image_encode_once(counted, tmp_path, rng):
    image = random_image(rng, 90, 200)
    engines = [counted(tmp_path), counted(tmp_path)]  # two "workers", one store
    click_at_once(engines, image, 8)
    assert sum(e.engine.encoder_calls for e in engines) == 1
    assert engines[0].engine.stats.in_flight._value.get() == 0


def test_a_stored_image_does_not_wait_for_another_images_encode(counted, tmp_path, rng):
    # New images queue for the encoder (one at a time, tests/test_encode_queue.py);
    # an image in the store is loaded at once, whatever is encoding.
    engine = counted(tmp_path)
    real = engine.engine._encoder
    gate = threading.Event()

    def encoder(x):
        if float(x[0, 0, 0, 0]) < 0.5:  # the first image's encode hangs until released
            assert gate.wait(30)
        return real(x)

    engine.engine._encoder = encoder
    slow = np.zeros((90, 200, 3), np.uint8)
    fast = np.full((90, 200, 3), 255, np.uint8)
    engine.embedding_for("fast", fast)
    engine.memory.clear()  # "fast" is now in the store only
    thread = threading.Thread(target=engine.embedding_for, args=("slow", slow))
    thread.start()
    time.sleep(0.2)
    engine.embedding_for("fast", lambda: pytest.fail("a stored image is not encoded"))
    assert thread.is_alive()  # returned while "slow" is still encoding
    gate.set()
    thread.join(30)


def test_a_failing_store_costs_an_encode_not_the_request(counted, tmp_path, rng, caplog):
    engine = counted(tmp_path)
    blocked = tmp_path / "v1" / engine.fingerprint[:32]
    blocked.write_text("a file where the preset directory should be")
    with caplog.at_level(logging.WARNING):
        embedding = engine.embedding_for("img-1", random_image(rng, 90, 200))
    assert embedding.frame.original_size == (90, 200)
    assert "Cannot write to the embedding store" in caplog.text


def test_ensure_stored_skips_what_is_stored(counted, tmp_path, rng):
    image = random_image(rng, 90, 200)
    engine = counted(tmp_path)
    assert engine.ensure_stored("img-1", image) is True
    assert engine.ensure_stored("img-1", lambda: pytest.fail("not loaded")) is False
    assert engine.engine.encoder_calls == 1 and len(engine.memory) == 0
    with pytest.raises(StoreError):
        EmbeddingTiers(SamEngine(engine.engine.model)).ensure_stored("img-1", image)


def test_preset_directory_engines_share_entries(tiny_preset_dir, tmp_path, rng):
    store = DiskStore(tmp_path, 1 << 30)
    image = random_image(rng, 90, 200)
    first = EmbeddingTiers(SamEngine.from_preset(str(tiny_preset_dir)), store=store)
    assert first.fingerprint == fingerprint_preset_dir(tiny_preset_dir)
    first.embedding_for("img-1", image)
    second = EmbeddingTiers(SamEngine.from_preset(str(tiny_preset_dir)), store=DiskStore(tmp_path, 1 << 30))
    second.embedding_for("img-1", image)
    assert (first.engine.encoder_calls, second.engine.encoder_calls) == (1, 0)


# ---------------------------------------------------------------- command line


def test_cache_command_stats_and_clear(tmp_path, capsys, monkeypatch):
    import json

    from sam_backend.commands.cli import main

    monkeypatch.delenv("SAM_CACHE_URL", raising=False)
    store = DiskStore(tmp_path, 1 << 20)
    store.put(key("a"), entry())
    assert main(["cache", "stats", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path} (disk): 1 embedding(s)" in out and "preset ab12cd34ef56ab78: 1 embedding(s)" in out
    assert main(["cache", "stats", "--cache-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 1
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert store.stats().entries == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["cache", "stats", "--cache-dir", str(blocker / "store")]) == 2


def test_an_image_served_from_memory_stays_recent_on_disk(counted, tmp_path, rng):
    engine = counted(tmp_path)
    engine.embedding_for("img-1", random_image(rng, 90, 200))
    (path,) = entry_files(tmp_path)
    os.utime(path, (time.time() - 1000,) * 2)
    engine.embedding_for("img-1", None)  # a memory hit
    assert time.time() - path.stat().st_mtime < 100
