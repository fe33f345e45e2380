"""The workers' shared state: files next to the embedding store, Redis, or one process's memory."""

import logging
import os
import stat
import time

import numpy as np
import pytest

from sam_backend.labelstudio.media import Credentials
from sam_backend.server.backend import ModelHolder, SamBackend
from sam_backend.server.refinement import RefinementMemory, prompt_signature
from sam_backend.server.shared_state import (
    DiskSharedState,
    MemorySharedState,
    RedisSharedState,
    open_shared_state,
)
from test_server import LABEL_CONFIG, fixture


@pytest.fixture(params=["disk", "redis"])
def workers(request, tmp_path):
    """Two workers' views of one shared state: a function that opens it again."""
    if request.param == "disk":
        return lambda: DiskSharedState(tmp_path / "shared")
    url = request.getfixturevalue("redis_url")
    return lambda: RedisSharedState.from_url(url)


@pytest.fixture(params=["memory", "disk", "redis"])
def any_state(request, tmp_path):
    if request.param == "memory":
        return MemorySharedState()
    if request.param == "disk":
        return DiskSharedState(tmp_path / "shared")
    return RedisSharedState.from_url(request.getfixturevalue("redis_url"))


def test_a_worker_sees_another_workers_newest_entry(workers):
    first, second = workers().map("projects"), workers().map("projects")
    assert first.get("3") is None
    first.put("3", b"one")
    assert second.get("3") == b"one"
    second.put("3", b"two")  # nothing stale is kept by the first
    assert first.get("3") == b"two"
    assert first.get_many(["3", "4"]) == [b"two", None]
    second.delete("3")
    assert first.get("3") is None and len(first) == 0


def test_entries_expire_and_the_oldest_go_past_the_bound(any_state):
    short = any_state.map("short", ttl=0.5, max_entries=10)
    short.put("k", b"v")
    assert short.get("k") == b"v"
    time.sleep(0.8)
    assert short.get("k") is None

    bounded = any_state.map("bounded", max_entries=3)
    for i in range(5):
        bounded.put(f"k{i}", str(i).encode())
        time.sleep(0.02)  # distinct write times, so "oldest" is well defined on disk
    assert len(bounded) == 3
    assert bounded.get_many([f"k{i}" for i in range(5)]) == [None, None, b"2", b"3", b"4"]


def test_maps_do_not_see_each_other(any_state):
    any_state.map("a").put("k", b"a")
    assert any_state.map("b").get("k") is None


def test_disk_state_is_readable_by_its_user_only(tmp_path):
    root = tmp_path / "store" / "shared"
    root.mkdir(parents=True, mode=0o755)
    os.chmod(root, 0o755)  # made by an older version, or by hand
    old = os.umask(0o022)
    try:
        state = DiskSharedState(root)
        state.map("projects").put("3", b'{"access_token": "secret"}')
    finally:
        os.umask(old)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) == 1 and not files[0].name.startswith(".")  # no temp file left behind
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    for directory in (root, root / "projects"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_a_damaged_file_is_a_miss(tmp_path):
    state = DiskSharedState(tmp_path)
    logits = RefinementMemory(shared=state)
    signature = prompt_signature([[1, 2]], [1], None)
    logits.remember("img", signature, np.ones((4, 4)))
    (entry,) = (tmp_path / "refine").iterdir()
    entry.write_bytes(entry.read_bytes()[:20])  # a header and part of the array
    assert logits.previous("img", prompt_signature([[1, 2], [3, 4]], [1, 1], None)) is None
    entry.write_bytes(b"")
    assert state.map("refine").get("anything") is None


def test_refinement_logits_reach_every_worker(workers):
    first, second = RefinementMemory(shared=workers()), RefinementMemory(shared=workers())
    logits = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    first.remember("img", prompt_signature([[10, 20]], [1], None), logits)
    found = second.previous("img", prompt_signature([[10, 20], [30, 5]], [1, 0], None))
    assert found is not None and found.dtype == np.float32
    np.testing.assert_array_equal(found, logits)
    assert second.previous("other", prompt_signature([[10, 20], [30, 5]], [1, 0], None)) is None
    assert len(second) == 1


def test_refinement_keeps_its_time_to_live_in_shared_state(tmp_path):
    now = [1000.0]
    memory = RefinementMemory(ttl_seconds=60, max_entries=2, clock=lambda: now[0], shared=DiskSharedState(tmp_path))
    memory.remember("img", prompt_signature([[1, 2]], [1], None), np.ones((4, 4)))
    two = prompt_signature([[1, 2], [3, 4]], [1, 1], None)
    assert memory.previous("img", two) is not None
    now[0] += 61
    assert memory.previous("img", two) is None


def backend_on(state):
    return SamBackend(holder=ModelHolder("tiny", loader=lambda preset: None), credentials=Credentials(), shared=state)


def test_a_setup_reaches_every_worker(workers):
    first, second = backend_on(workers()), backend_on(workers())
    setup = fixture("setup.json")
    setup["schema"] = LABEL_CONFIG.replace("</View>", '<PolygonLabels name="poly" toName="image">'
                                           '<Label value="Cat"/></PolygonLabels></View>')
    setup["extra_params"] = '{"output": "polygon", "prelabel": "auto"}'
    first.setup(setup)
    assert second.output_settings("1.1795260000").kind == "polygon"
    assert second.prelabel_settings("1").mode == "auto"
    assert second.credentials_for("1").token == "0123456789abcdef"
    assert second.projects["1"].label_config == setup["schema"]
    assert "2" not in second.projects and second.projects.get("2") is None


def test_backends_without_shared_state_stay_apart():
    first, second = backend_on(None), backend_on(None)
    first.setup(fixture("setup.json"))
    assert "1" in first.projects and "1" not in second.projects


def test_setup_tokens_on_disk_are_private(tmp_path):
    backend_on(DiskSharedState(tmp_path / "shared")).setup(fixture("setup.json"))
    (entry,) = (tmp_path / "shared" / "projects").iterdir()
    assert b"0123456789abcdef" in entry.read_bytes()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600


def test_the_state_follows_the_embedding_store(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("SAM_CACHE_URL", raising=False)
    monkeypatch.setenv("SAM_CACHE_DIR", str(tmp_path / "store"))
    state = open_shared_state()
    assert state.kind == "disk" and state.location == str(tmp_path / "store" / "shared")

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        state = open_shared_state(cache_dir=str(blocker / "store"))
    assert state.kind == "memory"
    assert "not writable" in caplog.text and "this worker's memory" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        state = open_shared_state(url="redis://127.0.0.1:9/0")
    assert state.kind == "memory" and "Cannot reach Redis" in caplog.text


def test_the_state_is_in_redis_when_the_store_is(redis_url, monkeypatch):
    monkeypatch.setenv("SAM_CACHE_URL", redis_url)
    state = open_shared_state()
    assert state.kind == "redis"
    state.map("projects").put("3", b"x")
    import redis

    keys = redis.Redis.from_url(redis_url).keys("sam:shared:projects:*")
    assert len(keys) == 2  # the entry and the map's index; none under the embedding store's prefix


def test_a_failed_redis_is_rested_not_asked_on_every_click(caplog):
    """A hung Redis costs one timeout, then the maps leave it alone for a while."""
    import logging

    class Down:
        calls = 0

        def mget(self, names):
            Down.calls += 1
            raise ConnectionError("timed out")

        def pipeline(self, transaction=False):
            Down.calls += 1
            raise ConnectionError("timed out")

    state = RedisSharedState(Down(), "redis://nowhere")
    refine, setups = state.map("refine", ttl=300), state.map("setups")
    with caplog.at_level(logging.WARNING):
        assert refine.get("a") is None
    assert Down.calls == 1 and "tries Redis again" in caplog.text
    refine.put("a", b"x")
    setups.put("p", b"{}")
    assert setups.get("p") is None and refine.get_many(["a", "b"]) == [None, None]
    assert Down.calls == 1  # every map shares the rest: no second timeout
