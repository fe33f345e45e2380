"""The HTTP protocol through Flask's test client, with a loopback media server."""

import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import random_image
from sam_backend.server.backend import ModelHolder, SamBackend
from sam_backend.labelstudio.media import Credentials, MediaFetcher
from sam_backend.server.app import create_app

FIXTURES = Path(__file__).parent / "fixtures"
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="brush" toName="image"><Label value="Dog"/><Label value="Cat"/></BrushLabels>'
    '<KeyPointLabels name="keypoint" toName="image" smart="true"><Label value="Cat" smart="true"/>'
    '<Label value="Zebra" smart="true"/></KeyPointLabels>'
    '<RectangleLabels name="box" toName="image" smart="true"><Label value="Cat"/></RectangleLabels>'
    "</View>"
)


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def make_backend(engine, tmp_path, credentials=None, store=None):
    holder = ModelHolder("tiny_preset", loader=lambda preset: engine, store=store)
    holder.start()
    holder.wait()
    return SamBackend(
        holder=holder,
        fetcher=MediaFetcher(cache_dir=str(tmp_path / "cache"), timeout=1.0),
        credentials=credentials if credentials is not None else Credentials(),
    )


@pytest.fixture()
def image(media, rng):
    pixels = random_image(rng, 90, 200)
    Image.fromarray(pixels).save(media.root / "img.png")
    (media.root / "upload" / "1").mkdir(parents=True)
    Image.fromarray(pixels).save(media.root / "upload" / "1" / "img.png")
    return pixels


@pytest.fixture()
def client(engine, tmp_path, media):
    backend = make_backend(engine, tmp_path)
    return create_app(backend).test_client()


def keypoint(x, y, positive=True, label="Cat", width=200, height=90, **extra):
    region = {
        "id": f"kp{x}{y}", "from_name": "keypoint", "to_name": "image", "type": "keypointlabels",
        "origin": "manual", "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": [label]},
        "is_positive": positive,
    }
    region.update(extra)
    return region


def rectangle(x, y, w, h, rotation=0, label="Cat"):
    return {
        "id": f"bx{x}{y}", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
        "original_width": 200, "original_height": 90, "image_rotation": 0,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]},
    }


def predict_body(url, regions, label_config=LABEL_CONFIG, task_id=7):
    return {
        "tasks": [{"id": task_id, "project": 1, "data": {"image": url}, "annotations": [], "predictions": []}],
        "project": "1.1795260000",
        "label_config": label_config,
        "params": {"login": None, "password": None, "context": {"result": regions} if regions is not None else None},
    }


def decode_brush(region):
    from label_studio_sdk.converter.brush import decode_rle

    h, w = region["original_height"], region["original_width"]
    return np.reshape(decode_rle(region["value"]["rle"]), (h, w, 4))[:, :, 3] > 127


# ------------------------------------------------------------------ endpoints


def test_health_and_root(client):
    for path in ("/", "/health"):
        body = client.get(path).get_json()
        assert body["status"] == "UP" and body["model_class"] == "SamBackend" and body["model_state"] == "ready"
        assert body["encoder_precision"] == "float32"  # tests pin SAM_PRECISION (conftest)


def test_setup_answers_model_version(client):
    body = client.post("/setup", json=fixture("setup.json")).get_json()
    assert body["model_version"].startswith("tiny_preset@sam-backend-")


def test_setup_with_an_unusable_config_connects_and_warns(client):
    setup = fixture("setup.json")
    setup["schema"] = '<View><Image name="image" value="$image"/></View>'
    response = client.post("/setup", json=setup)
    assert response.status_code == 200 and "no <BrushLabels>" in response.get_json()["warning"]


def test_webhook_versions_metrics(client):
    response = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3}})
    assert response.status_code == 200 and response.get_json()["status"] == "ignored"
    assert client.get("/versions").get_json()["versions"][0].startswith("tiny_preset@")
    client.get("/health")
    text = client.get("/metrics").get_data(as_text=True)
    assert "sam_requests_total" in text and "sam_model_loaded 1.0" in text


# ----------------------------------------------------------- interactive masks


@pytest.mark.parametrize(
    "regions, points, labels, box",
    [
        ([keypoint(25, 50)], [[50, 45]], [1], None),
        ([keypoint(25, 50), keypoint(60, 20, positive=False)], [[50, 45], [120, 18]], [1, 0], None),
        ([keypoint(25, 50, is_positive=None)], [[50, 45]], [1], None),
        ([rectangle(10, 20, 50, 60)], None, None, [20, 18, 120, 72]),
        ([rectangle(10, 20, 50, 60), keypoint(25, 50)], [[50, 45]], [1], [20, 18, 120, 72]),
    ],
    ids=["positive", "positive+negative", "is_positive-missing", "box", "box+point"],
)
def test_interactive_prompts_become_the_engines_mask(client, engine, media, image, regions, points, labels, box):
    response = client.post("/predict", json=predict_body(media.url + "/img.png", regions))
    assert response.status_code == 200, response.get_json()
    results = response.get_json()["results"]
    assert len(results) == 1
    (region,) = results[0]["result"]
    assert region["type"] == "brushlabels" and region["from_name"] == "brush" and region["to_name"] == "image"
    assert (region["original_width"], region["original_height"]) == (200, 90)
    expected = engine.decode(engine.encode(image), points=points, labels=labels, box=box)
    np.testing.assert_array_equal(decode_brush(region), expected.mask)  # RLE round trip
    assert region["score"] == pytest.approx(expected.score, abs=1e-6)
    assert results[0]["model_version"].startswith("tiny_preset@")


def test_shared_keypoint_example_shape(client, media, image):
    body = fixture("interactive_keypoint.json")
    body["tasks"][0]["data"]["image"] = media.url + "/img.png"
    results = client.post("/predict", json=body).get_json()["results"]
    (region,) = results[0]["result"]
    # The context says 1280x720 (as Label Studio measured it): the mask is sent at that size.
    assert (region["original_width"], region["original_height"]) == (1280, 720)
    assert decode_brush(region).shape == (720, 1280)


def test_region_ids_are_unique(client, media, image):
    ids = {
        client.post("/predict", json=predict_body(media.url + "/img.png", [keypoint(25, 50)])).get_json()[
            "results"][0]["result"][0]["id"]
        for _ in range(3)
    }
    assert len(ids) == 3


@pytest.mark.parametrize("label, expected", [("Cat", "Cat"), ("Zebra", "Dog")])
def test_brush_label_follows_the_clicked_label(client, media, image, label, expected):
    body = predict_body(media.url + "/img.png", [keypoint(25, 50, label=label)])
    region = client.post("/predict", json=body).get_json()["results"][0]["result"][0]
    assert region["value"]["brushlabels"] == [expected]


def test_regions_of_other_images_or_controls_are_ignored(client, media, image):
    other = keypoint(25, 50)
    other["to_name"] = "other_image"
    brush = {"from_name": "brush", "to_name": "image", "type": "brushlabels", "value": {"rle": [], "brushlabels": ["Dog"]}}
    result = client.post("/predict", json=predict_body(media.url + "/img.png", [other, brush])).get_json()["results"]
    assert result == [{"result": [], "model_version": result[0]["model_version"]}]


def test_batch_without_context_answers_one_entry_per_task_in_order(client, media, image, caplog):
    body = fixture("batch_predict.json")
    results = client.post("/predict", json=body).get_json()["results"]
    # Task 1 has nothing to start from: an empty prediction. Task 2's detector
    # box would give a mask, but its image cannot be fetched (no Label Studio
    # URL here): no prediction for it, which Label Studio accepts, and a log line.
    assert len(results) == 2 and results[0]["result"] == [] and results[1] == []
    assert "Task 2: no prediction" in caplog.text and "cannot fetch /data/upload/1/b.png" in caplog.text


def test_batch_without_context_warms_the_cache(engine, tmp_path, media, image):
    backend = make_backend(engine, tmp_path)
    client = create_app(backend).test_client()
    client.post("/predict", json=predict_body(media.url + "/img.png", None))
    backend._warmup.submit(lambda: None).result(timeout=30)  # queue drained
    assert len(backend.holder.embeddings().memory) == 1
    calls = engine.encoder_calls
    client.post("/predict", json=predict_body(media.url + "/img.png", [keypoint(25, 50)]))
    assert engine.encoder_calls == calls


def test_batch_of_many_tasks_does_not_queue_warmups(engine, tmp_path, media, image):
    backend = make_backend(engine, tmp_path)
    client = create_app(backend).test_client()
    body = predict_body(media.url + "/img.png", None)
    body["tasks"] = body["tasks"] * 3
    assert len(client.post("/predict", json=body).get_json()["results"]) == 3
    backend._warmup.submit(lambda: None).result(timeout=30)
    assert len(backend.holder.embeddings().memory) == 0


# -------------------------------------------------------------- task media


def test_label_studio_upload_with_env_credentials(engine, tmp_path, media, image):
    backend = make_backend(engine, tmp_path, Credentials(media.url, media.token))
    client = create_app(backend).test_client()
    response = client.post("/predict", json=predict_body("/data/upload/1/img.png", [keypoint(25, 50)]))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["results"][0]["result"]


def test_setup_credentials_are_used_without_env(client, media, image):
    setup = fixture("setup.json")
    setup.update(hostname=media.url, access_token=media.token)
    client.post("/setup", json=setup)
    response = client.post("/predict", json=predict_body("/data/upload/1/img.png", [keypoint(25, 50)]))
    assert response.status_code == 200, response.get_json()


def test_personal_access_token_is_exchanged(monkeypatch, tmp_path):
    claims = base64.urlsafe_b64encode(json.dumps({"token_type": "refresh", "exp": 9e9}).encode()).decode().rstrip("=")
    pat = f"e30.{claims}.sig"
    seen = {}

    class Answer:
        status_code = 200

        def json(self):
            return {"access": "e30.e30.access"}

    def fake_post(url, json, timeout):
        seen.update(url=url, body=json)
        return Answer()

    monkeypatch.setattr("sam_backend.labelstudio.media.requests.post", fake_post)
    token = MediaFetcher(cache_dir=str(tmp_path))._bearer_token(Credentials("http://ls:8080", pat))
    assert token == "e30.e30.access"
    assert seen == {"url": "http://ls:8080/api/token/refresh/", "body": {"refresh": pat}}


# ---------------------------------------------------------------- bad input


def bad_requests(media):
    url = media.url + "/img.png"
    no_brush = '<View><Image name="image" value="$image"/><KeyPointLabels name="keypoint" toName="image"><Label value="Cat"/></KeyPointLabels></View>'
    no_image_field = predict_body(url, [keypoint(25, 50)])
    no_image_field["tasks"][0]["data"] = {"text": "hello"}
    return {
        "malformed-json": (b"{not json", 400, "must be JSON"),
        "not-an-object": (b"[1, 2]", 400, "JSON object"),
        "missing-tasks": ({"label_config": LABEL_CONFIG}, 400, '"tasks"'),
        "empty-tasks": ({"tasks": [], "label_config": LABEL_CONFIG}, 400, "non-empty"),
        "task-without-image": (no_image_field, 400, 'no "image" in its data'),
        "image-404": (predict_body(media.url + "/gone.png", [keypoint(25, 50)]), 502, "HTTP 404"),
        "unreachable": (predict_body("http://127.0.0.1:9/x.png", [keypoint(25, 50)]), 502, "cannot reach"),
        "slow-media": (predict_body(media.url + "/slow/img.png", [keypoint(25, 50)]), 504, "longer than"),
        "upload-no-credentials": (predict_body("/data/upload/1/img.png", [keypoint(25, 50)]), 502, "LABEL_STUDIO_API_KEY"),
        "not-an-image": (predict_body(media.url + "/page.html", [keypoint(25, 50)]), 422, "not an image"),
        "corrupt": (predict_body(media.url + "/corrupt.jpg", [keypoint(25, 50)]), 422, "truncated or corrupt"),
        "too-many-pixels": (predict_body(media.url + "/huge.png", [keypoint(25, 50)]), 422, "SAM_MAX_IMAGE_PIXELS"),
        "config-without-brush": (predict_body(url, [keypoint(25, 50)], label_config=no_brush), 422, "no <BrushLabels>"),
        "config-missing": (predict_body(url, [keypoint(25, 50)], label_config=""), 422, "no label config"),
        "zero-size-rectangle": (predict_body(url, [rectangle(10, 20, 0, 30)]), 400, "zero width or height"),
        "bad-region": (predict_body(url, [{"from_name": "keypoint", "to_name": "image", "type": "keypointlabels", "value": {"x": "left"}}]), 400, "numeric value.x"),
        "bad-context": ({**predict_body(url, None), "params": {"context": [1]}}, 400, "params.context"),
    }


@pytest.fixture()
def bad_media(media, image):
    (media.root / "page.html").write_text("<html>hello</html>")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG")
    (media.root / "corrupt.jpg").write_bytes(buffer.getvalue()[:300])
    Image.new("L", (5000, 4000)).save(media.root / "huge.png")
    return media


@pytest.mark.parametrize("case", [
    "malformed-json", "not-an-object", "missing-tasks", "empty-tasks", "task-without-image", "image-404",
    "unreachable", "slow-media", "upload-no-credentials", "not-an-image", "corrupt", "too-many-pixels",
    "config-without-brush", "config-missing", "zero-size-rectangle", "bad-region", "bad-context",
])
def test_bad_input_gets_a_clear_error_and_the_next_request_works(client, bad_media, monkeypatch, case):
    monkeypatch.setenv("SAM_MAX_IMAGE_PIXELS", "10000000")
    body, status, message = bad_requests(bad_media)[case]
    if isinstance(body, bytes):
        response = client.post("/predict", data=body, content_type="application/json")
    else:
        response = client.post("/predict", json=body)
    assert response.status_code == status, response.get_json()
    assert message in response.get_json()["error"]
    good = client.post("/predict", json=predict_body(bad_media.url + "/img.png", [keypoint(25, 50)]))
    assert good.status_code == 200 and good.get_json()["results"][0]["result"]


# ------------------------------------------------------------ model loading


def post_in_thread(app, body):
    """POST /predict from another thread (its own test client); the response lands in the returned dict."""
    answer = {}

    def post():
        started = time.monotonic()
        answer["response"] = app.test_client().post("/predict", json=body)
        answer["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=post)
    thread.start()
    return thread, answer


def test_loading_model_answers_health_and_503(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_LOAD_WAIT", "1.5")
    release = threading.Event()
    holder = ModelHolder("slow", loader=lambda preset: release.wait(30) and None)
    app = create_app(SamBackend(holder=holder, fetcher=MediaFetcher(cache_dir=str(tmp_path))))
    client = app.test_client()
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json()["model_state"] == "loading"
    thread, answer = post_in_thread(app, predict_body("http://x/y.png", [keypoint(1, 1)]))
    time.sleep(0.2)
    started = time.monotonic()  # /health answers at once while a /predict waits for the model
    health = client.get("/health")
    assert time.monotonic() - started < 0.5 and health.get_json()["model_state"] == "loading"
    assert client.post("/setup", json=fixture("setup.json")).status_code == 200
    thread.join(30)
    response = answer["response"]
    assert answer["seconds"] >= 1.5  # it waited SAM_LOAD_WAIT, then gave up
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert "still loading" in response.get_json()["error"]
    release.set()


def test_a_click_while_the_model_loads_is_answered_once_it_is_ready(engine, tmp_path, media, image):
    release = threading.Event()
    holder = ModelHolder("slow", loader=lambda preset: engine if release.wait(30) else None)
    app = create_app(SamBackend(holder=holder, fetcher=MediaFetcher(cache_dir=str(tmp_path / "cache"))))
    thread, answer = post_in_thread(app, predict_body(media.url + "/img.png", [keypoint(25, 50)]))
    time.sleep(0.5)
    assert thread.is_alive()  # waiting for the model, not refused
    health = app.test_client().get("/health")
    assert health.get_json()["model_state"] == "loading"
    release.set()
    thread.join(60)
    response = answer["response"]
    assert response.status_code == 200, response.get_json()
    (region,) = response.get_json()["results"][0]["result"]
    assert decode_brush(region).shape == (90, 200)


def test_with_one_thread_a_click_while_loading_is_refused_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("THREADS", "1")  # waiting would keep /health from being answered
    release = threading.Event()
    holder = ModelHolder("slow", loader=lambda preset: release.wait(30) and None)
    client = create_app(SamBackend(holder=holder, fetcher=MediaFetcher(cache_dir=str(tmp_path)))).test_client()
    started = time.monotonic()
    response = client.post("/predict", json=predict_body("http://x/y.png", [keypoint(1, 1)]))
    assert response.status_code == 503 and time.monotonic() - started < 5
    release.set()


def test_failed_model_is_reported_not_crashed(tmp_path):
    def fail(preset):
        from sam_backend.errors import PresetLoadError

        raise PresetLoadError("Could not load the SAM preset 'nope': no network")

    holder = ModelHolder("nope", loader=fail)
    client = create_app(SamBackend(holder=holder, fetcher=MediaFetcher(cache_dir=str(tmp_path)))).test_client()
    holder.wait(10)
    health = client.get("/health").get_json()
    assert health["status"] == "UP" and health["model_state"] == "failed" and "no network" in health["error"]
    response = client.post("/predict", json=predict_body("http://x/y.png", [keypoint(1, 1)]))
    assert response.status_code == 503 and "failed to load" in response.get_json()["error"]


# ------------------------------------------------------------------ basic auth


def test_basic_auth(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("BASIC_AUTH_USER", "annotator")
    monkeypatch.setenv("BASIC_AUTH_PASS", "s3cret")
    client = create_app(make_backend(engine, tmp_path)).test_client()
    assert client.get("/health").status_code == 401
    bad = base64.b64encode(b"annotator:wrong").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    good = base64.b64encode(b"annotator:s3cret").decode()
    response = client.get("/health", headers={"Authorization": f"Basic {good}"})
    assert response.status_code == 200 and response.get_json()["status"] == "UP"


def test_health_answers_while_an_embedding_is_computed(engine, tmp_path, media, image):
    """Label Studio gives /health 1 s; a threaded server answers it during a long encode."""
    import time

    import requests
    from werkzeug.serving import make_server

    encoding = threading.Event()
    real_encoder = engine._encoder

    def slow_encoder(x):
        encoding.set()
        time.sleep(3)  # a large image on a CPU
        return real_encoder(x)

    engine._encoder = slow_encoder
    server = make_server("127.0.0.1", 0, create_app(make_backend(engine, tmp_path)), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        click = threading.Thread(
            target=requests.post, args=(url + "/predict",),
            kwargs={"json": predict_body(media.url + "/img.png", [keypoint(25, 50)]), "timeout": 100},
        )
        click.start()
        assert encoding.wait(30)
        started = time.perf_counter()
        assert requests.get(url + "/health", timeout=1).json()["status"] == "UP"
        assert time.perf_counter() - started < 1.0
        click.join(60)
    finally:
        server.shutdown()
