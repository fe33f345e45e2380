"""Media fetching that cannot be turned against the backend's network, and bad inputs through the server.

Each refusal is a JSON error with a fitting status, nothing is fetched, and
the next good request is served.
"""

import ipaddress
import os
import socket
import time
import urllib.parse

import pytest
from PIL import Image

from conftest import random_image
from sam_backend.errors import MediaRefusedError
from sam_backend.labelstudio import media_safety
from sam_backend.labelstudio.media import Credentials, MediaFetcher
from sam_backend.labelstudio.media_safety import MediaPolicy, MediaSession, address_kind
from sam_backend.server.app import create_app
from test_server import keypoint, make_backend, predict_body, rectangle

IO_MODULE = "label_studio_sdk._extensions.label_studio_tools.core.utils.io"
REAL_GETADDRINFO = socket.getaddrinfo


# ------------------------------------------------------------------ the policy


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("::1", "loopback"),
    ("10.0.0.5", "private"), ("172.16.3.4", "private"), ("192.168.1.1", "private"), ("fd00::5", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("100.64.0.1", "shared (CGNAT)"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "reserved"), ("fec0::1", "site-local"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"),
    ("2002:a00:5::", "private"),  # 6to4 of 10.0.0.5
    ("64:ff9b::a00:5", "private"),  # NAT64 of 10.0.0.5
    ("8.8.8.8", None), ("2606:4700::1111", None), ("64:ff9b::808:808", None), ("::ffff:8.8.8.8", None),
])
def test_address_kinds(address, kind):
    assert address_kind(address) == kind


def test_allowed_hosts_are_names_addresses_and_networks_with_optional_ports(caplog):
    policy = MediaPolicy.from_env({
        "SAM_MEDIA_ALLOWED_HOSTS": "MinIO, cache.internal:6000 10.1.0.0/16,10.0.0.5:9000,[fd00::5]:8080, fd00::7, a b/c",
    })
    assert set(policy.allowed_names) == {("minio", None), ("cache.internal", 6000), ("a", None)}
    assert set(policy.allowed_networks) == {
        (ipaddress.ip_network("10.1.0.0/16"), None), (ipaddress.ip_network("10.0.0.5/32"), 9000),
        (ipaddress.ip_network("fd00::5/128"), 8080), (ipaddress.ip_network("fd00::7/128"), None),
    }
    assert "cannot read 'b/c'" in caplog.text


def fake_dns(monkeypatch, table):
    """Names in ``table`` resolve to its addresses; others as usual."""
    def getaddrinfo(host, port, *args, **kwargs):
        if host in table:
            answer = table[host]
            addresses = answer() if callable(answer) else answer
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                    for a in addresses]
        return REAL_GETADDRINFO(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def refused(policy, url) -> str:
    with pytest.raises(MediaRefusedError) as caught:
        policy.check_url(url)
    return str(caught.value)


def test_names_ports_private_networks_and_the_label_studio_host(monkeypatch):
    fake_dns(monkeypatch, {"minio": ["10.0.0.9"], "ls.internal": ["10.0.0.2"], "cdn.example": ["93.184.216.34"],
                           "mixed.example": ["93.184.216.34", "10.0.0.3"]})
    policy = MediaPolicy.from_env({"SAM_MEDIA_ALLOWED_HOSTS": "minio:9000,10.0.0.7"})
    policy.check_url("https://cdn.example/a.png")
    policy.check_url("http://minio:9000/bucket/a.png")
    assert "SAM_MEDIA_ALLOWED_HOSTS" in refused(policy, "http://minio:9001/bucket/a.png")
    policy.check_url("http://10.0.0.7:1234/a.png")  # an address without a port: every port
    # Every address a name resolves to is checked.
    assert "mixed.example resolves to 10.0.0.3, a private address" in refused(policy, "http://mixed.example/a.png")
    # Label Studio's host, at its own port, whatever it resolves to.
    message = refused(policy, "http://ls.internal:8080/data/upload/1/a.png")
    assert '"ls.internal:8080"' in message and "SAM_MEDIA_ALLOW_PRIVATE=1" in message
    with_ls = policy.for_labelstudio("http://LS.internal:8080/")
    with_ls.check_url("http://ls.internal:8080/data/upload/1/a.png")
    refused(with_ls, "http://ls.internal:6379/")
    # SAM_MEDIA_ALLOW_PRIVATE opens private networks, not link-local (cloud metadata) ones.
    private = MediaPolicy.from_env({"SAM_MEDIA_ALLOW_PRIVATE": "1"})
    private.check_url("http://10.0.0.5:6379/")
    private.check_url("http://127.0.0.1:8080/a.png")
    message = refused(private, "http://169.254.169.254/latest/meta-data/")
    assert "169.254.169.254 is a link-local address" in message and "does not open link-local" in message


def test_schemes_other_than_http_are_refused():
    policy = MediaPolicy()
    for url in ("file:///etc/passwd", "ftp://example.com/a.png", "gopher://example.com:70/_x", "data:image/png;base64,AA"):
        assert "only http(s) URLs" in refused(policy, url)


def test_a_name_that_rebinds_after_the_check_is_refused_at_connect(monkeypatch):
    """The connection resolves again and checks what it connects to: no second lookup can slip past."""
    answers = iter([["93.184.216.34"], ["10.0.0.9"]])
    fake_dns(monkeypatch, {"rebind.example": lambda: next(answers)})
    connected = []
    monkeypatch.setattr(media_safety, "create_connection", lambda *a, **k: connected.append(a) or 1 / 0)
    session = MediaSession(MediaPolicy(), timeout=2)
    with pytest.raises(MediaRefusedError, match="rebind.example resolves to 10.0.0.9"):
        session.get("http://rebind.example/a.png")
    assert connected == []


def test_the_connection_goes_to_the_checked_address(monkeypatch, media):
    (media.root / "a.txt").write_text("hello")
    fake_dns(monkeypatch, {"media.example": ["127.0.0.1"]})
    session = MediaSession(MediaPolicy.from_env({"SAM_MEDIA_ALLOWED_HOSTS": f"127.0.0.1:{media.port}"}), timeout=2)
    assert session.get(f"http://media.example:{media.port}/a.txt").text == "hello"


# --------------------------------------------------------- through the server


@pytest.fixture()
def served(engine, tmp_path, media, monkeypatch, rng):
    """A client whose backend allows the media server's port on 127.0.0.1, and nothing else private."""
    monkeypatch.setenv("SAM_MEDIA_ALLOWED_HOSTS", f"127.0.0.1:{media.port}")
    monkeypatch.setenv("SAM_MAX_DOWNLOAD_MB", "1")
    Image.fromarray(random_image(rng, 90, 200)).save(media.root / "img.png")
    backend = make_backend(engine, tmp_path)
    return create_app(backend).test_client(), backend


def assert_next_click_works(client, media):
    good = client.post("/predict", json=predict_body(media.url + "/img.png", [keypoint(25, 50)]))
    assert good.status_code == 200, good.get_json()
    assert good.get_json()["results"][0]["result"]


def redirect(media, target):
    return f"{media.url}/redirect?to={urllib.parse.quote(target, safe='')}"


def cached_files(backend):
    cache = backend.fetcher.cache_dir
    return [name for name in os.listdir(cache) if name != ".locks"]


@pytest.mark.parametrize("url, where", [
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://10.0.0.5:6379/", "10.0.0.5 is a private address"),
    ("http://192.168.1.1/admin", "192.168.1.1 is a private address"),
    ("http://127.0.0.2:{port}/img.png", "127.0.0.2 is a loopback address"),
    ("http://127.0.0.1:9/img.png", "127.0.0.1 is a loopback address"),  # the allowed address, another port
    ("http://[::1]:{port}/img.png", "::1 is a loopback address"),
    ("http://[fe80::1]/img.png", "fe80::1 is a link-local address"),
    ("http://[::ffff:127.0.0.1]:9/img.png", "::ffff:127.0.0.1 is a loopback address"),
    ("http://0.0.0.0:{port}/img.png", "0.0.0.0 is a unspecified address"),
    ("http://100.64.0.1/img.png", "100.64.0.1 is a shared (CGNAT) address"),
    ("http://internal.example/img.png", "internal.example resolves to 10.20.30.40, a private address"),
    ("file:///etc/passwd", "only http(s) URLs"),
    ("ftp://example.com/img.png", "only http(s) URLs"),
    ("gopher://example.com:70/_GET", "only http(s) URLs"),
    ("/etc/passwd", "only http(s) URLs"),
])
def test_refused_media_is_a_403_and_never_fetched(served, media, monkeypatch, url, where):
    client, backend = served
    fake_dns(monkeypatch, {"internal.example": ["10.20.30.40"]})
    connected = []
    real_connect = media_safety.create_connection
    monkeypatch.setattr(media_safety, "create_connection", lambda *a, **k: connected.append(a[0]) or real_connect(*a, **k))
    response = client.post("/predict", json=predict_body(url.format(port=media.port), [keypoint(25, 50)]))
    assert response.status_code == 403, response.get_json()
    error = response.get_json()["error"]
    assert error.startswith("Task 7: Refused to fetch") and where in error
    assert "SAM_MEDIA_ALLOWED_HOSTS" in error or "only http(s)" in error
    assert connected == [] and media.requests == []
    assert_next_click_works(client, media)


@pytest.mark.parametrize("target, where", [
    ("http://10.0.0.5:6379/", "10.0.0.5 is a private address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://127.0.0.1:9/img.png", "127.0.0.1 is a loopback address"),
    ("file:///etc/passwd", "only http(s) URLs"),
])
def test_a_redirect_to_a_refused_host_is_refused(served, media, target, where):
    client, _ = served
    response = client.post("/predict", json=predict_body(redirect(media, target), [keypoint(25, 50)]))
    assert response.status_code == 403, response.get_json()
    assert f"Refused to fetch {target}" in response.get_json()["error"] and where in response.get_json()["error"]
    assert len(media.requests) == 1  # the allowed first hop only
    assert_next_click_works(client, media)


def test_redirects_to_allowed_hosts_are_followed_and_bounded(served, media):
    client, _ = served
    response = client.post("/predict", json=predict_body(redirect(media, media.url + "/img.png"), [keypoint(25, 50)]))
    assert response.status_code == 200 and response.get_json()["results"][0]["result"]
    url = media.url + "/img.png"
    for _ in range(media_safety.MAX_REDIRECTS + 1):
        url = redirect(media, url)
    response = client.post("/predict", json=predict_body(url, [keypoint(25, 50)]))
    assert response.status_code == 502 and "redirected more than 5 times" in response.get_json()["error"]
    assert_next_click_works(client, media)


def test_an_oversized_download_is_cut_and_leaves_no_file(served, media):
    client, backend = served
    response = client.post("/predict", json=predict_body(media.url + "/huge", [keypoint(25, 50)]))
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert "/huge is 200 MB, more than the download limit of 1 MB (SAM_MAX_DOWNLOAD_MB)" in error
    assert cached_files(backend) == []
    assert_next_click_works(client, media)


def test_an_endless_download_is_cut_and_leaves_no_file(served, media):
    client, backend = served
    started = time.perf_counter()
    response = client.post("/predict", json=predict_body(media.url + "/endless", [keypoint(25, 50)]))
    assert response.status_code == 422, response.get_json()
    assert "sent more than the download limit of 1 MB" in response.get_json()["error"]
    assert time.perf_counter() - started < 10
    assert cached_files(backend) == []
    assert_next_click_works(client, media)
    assert cached_files(backend)  # the good image is cached as before


def test_the_label_studio_host_is_allowed_even_on_loopback(engine, tmp_path, media, monkeypatch, rng):
    monkeypatch.delenv("SAM_MEDIA_ALLOWED_HOSTS")
    (media.root / "upload" / "1").mkdir(parents=True)
    Image.fromarray(random_image(rng, 90, 200)).save(media.root / "upload" / "1" / "img.png")
    Image.fromarray(random_image(rng, 90, 200)).save(media.root / "img.png")
    client = create_app(make_backend(engine, tmp_path, Credentials(media.url, media.token))).test_client()
    for url in ("/data/upload/1/img.png", media.url + "/img.png"):
        response = client.post("/predict", json=predict_body(url, [keypoint(25, 50)]))
        assert response.status_code == 200, response.get_json()
    other_port = media.url.replace(str(media.port), "9")
    assert client.post("/predict", json=predict_body(other_port + "/img.png", [keypoint(25, 50)])).status_code == 403


def test_the_host_setup_names_is_allowed(engine, tmp_path, media, monkeypatch, rng):
    monkeypatch.delenv("SAM_MEDIA_ALLOWED_HOSTS")
    (media.root / "upload" / "1").mkdir(parents=True)
    Image.fromarray(random_image(rng, 90, 200)).save(media.root / "upload" / "1" / "img.png")
    client = create_app(make_backend(engine, tmp_path)).test_client()
    body = predict_body("/data/upload/1/img.png", [keypoint(25, 50)])
    body["tasks"][0]["data"]["image"] = media.url + "/data/upload/1/img.png"
    assert client.post("/predict", json=body).status_code == 403
    client.post("/setup", json={"project": "1.1795260000", "hostname": media.url, "access_token": media.token})
    for url in ("/data/upload/1/img.png", media.url + "/data/upload/1/img.png"):
        response = client.post("/predict", json=predict_body(url, [keypoint(25, 50)]))
        assert response.status_code == 200, response.get_json()


def test_a_cached_image_needs_no_lookup(served, media, monkeypatch):
    client, _ = served
    assert_next_click_works(client, media)

    def no_dns(*args, **kwargs):
        raise AssertionError("looked up")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert_next_click_works(client, media)


def test_an_oversized_request_body_is_a_413(engine, tmp_path, media, monkeypatch, rng):
    monkeypatch.setenv("SAM_MAX_REQUEST_MB", "0.01")
    Image.fromarray(random_image(rng, 90, 200)).save(media.root / "img.png")
    client = create_app(make_backend(engine, tmp_path)).test_client()
    body = predict_body(media.url + "/img.png", [keypoint(25, 50)])
    body["tasks"][0]["data"]["padding"] = "x" * 20_000
    response = client.post("/predict", json=body)
    assert response.status_code == 413
    assert "larger than 0.01 MB (SAM_MAX_REQUEST_MB)" in response.get_json()["error"]
    assert_next_click_works(client, media)


def test_the_default_request_limit_is_50_mb(engine, tmp_path, monkeypatch):
    monkeypatch.delenv("SAM_MAX_REQUEST_MB", raising=False)
    assert create_app(make_backend(engine, tmp_path)).config["MAX_CONTENT_LENGTH"] == 50 * 1024 * 1024


# ---------------------------------------------------------------- local files


@pytest.fixture()
def local_root(tmp_path, monkeypatch, rng):
    root = tmp_path / "local-files"
    (root / "imgs").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(random_image(rng, 90, 200)).save(root / "imgs" / "img.png")
    Image.fromarray(random_image(rng, 90, 200)).save(outside / "secret.png")
    (root / "imgs" / "link.png").symlink_to(outside / "secret.png")
    (root / "imgs" / "inside.png").symlink_to(root / "imgs" / "img.png")
    monkeypatch.setattr(f"{IO_MODULE}.LOCAL_FILES_DOCUMENT_ROOT", str(root))
    return root, outside


@pytest.mark.parametrize("path", [
    "../outside/secret.png", "imgs/../../outside/secret.png", "%2e%2e/outside/secret.png",
    "%2E%2E%2Foutside%2Fsecret.png", "..", "imgs/link.png",
])
def test_local_files_paths_out_of_the_root_are_refused(served, media, local_root, path):
    client, _ = served
    response = client.post("/predict", json=predict_body(f"/data/local-files/?d={path}", [keypoint(25, 50)]))
    assert response.status_code == 403, response.get_json()
    assert "Refused to read" in response.get_json()["error"]
    assert_next_click_works(client, media)


def test_local_files_dot_dot_is_refused_without_a_root(served, media):
    client, _ = served
    response = client.post("/predict", json=predict_body("/data/local-files/?d=../etc/passwd", [keypoint(25, 50)]))
    assert response.status_code == 403 and "leaves the document root" in response.get_json()["error"]


def test_local_files_inside_the_root_are_read_and_absolute_paths_stay_in_it(served, media, local_root):
    client, _ = served
    root, outside = local_root
    for path in ("imgs/img.png", "imgs/inside.png", "/imgs/img.png"):
        response = client.post("/predict", json=predict_body(f"/data/local-files/?d={path}", [keypoint(25, 50)]))
        assert response.status_code == 200, (path, response.get_json())
    # An absolute path is relative to the root, as in Label Studio: the file outside is never read.
    response = client.post("/predict", json=predict_body(f"/data/local-files/?d={outside}/secret.png", [keypoint(25, 50)]))
    assert response.status_code == 502 and "LABEL_STUDIO_API_KEY" in response.get_json()["error"]


def test_fetcher_refuses_without_a_server(tmp_path, monkeypatch):
    monkeypatch.delenv("SAM_MEDIA_ALLOWED_HOSTS", raising=False)
    fetcher = MediaFetcher(cache_dir=str(tmp_path))
    with pytest.raises(MediaRefusedError, match="Task 3: Refused to fetch http://127.0.0.1:8080/a.png"):
        fetcher.fetch("http://127.0.0.1:8080/a.png", task_id=3)


# ----------------------------------------------------------------- bad inputs


def body_with_image(value):
    body = predict_body("x", [keypoint(25, 50)])
    body["tasks"][0]["data"]["image"] = value
    return body


def region_body(media, region):
    return predict_body(media.url + "/img.png", [region])


def bad_inputs(media):
    nan_x = keypoint(25, 50)
    nan_x["value"]["x"] = float("nan")
    return {
        "image-number": (body_with_image(42), "must be a URL string"),
        "image-list": (body_with_image(["http://a/b.png"]), "must be a URL string"),
        "image-object": (body_with_image({"url": "http://a/b.png"}), "must be a URL string"),
        "image-empty": (body_with_image(""), 'no "image" in its data'),
        "x-string": (region_body(media, {**keypoint(25, 50), "value": {"x": "left", "y": 3}}), "numeric value.x"),
        "y-list": (region_body(media, {**keypoint(25, 50), "value": {"x": 3, "y": [1]}}), "numeric value.y"),
        "x-nan": (region_body(media, nan_x), "non-finite value.x"),
        "x-huge": (region_body(media, {**keypoint(25, 50), "value": {"x": 1e308, "y": 3}}), "finite"),
        "width-string": (region_body(media, {**rectangle(10, 20, 50, 60), "value": {
            "x": 10, "y": 20, "width": "wide", "height": 60}}), "numeric value.width"),
        "width-negative": (region_body(media, rectangle(10, 20, -50, 60)), "zero width or height"),
        "height-nan": (region_body(media, rectangle(10, 20, 50, float("nan"))), "non-finite value.height"),
        "rotation-string": (region_body(media, {**rectangle(10, 20, 50, 60), "value": {
            "x": 10, "y": 20, "width": 50, "height": 60, "rotation": "left"}}), "value.rotation"),
        "rotation-nan": (region_body(media, {**rectangle(10, 20, 50, 60), "value": {
            "x": 10, "y": 20, "width": 50, "height": 60, "rotation": float("nan")}}), "value.rotation"),
        "original-width-string": (region_body(media, keypoint(25, 50, original_width="wide")), "original size"),
        "original-width-negative": (region_body(media, keypoint(25, 50, original_width=-200)), "original size"),
        "original-width-nan": (region_body(media, keypoint(25, 50, original_width=float("nan"))), "original size"),
        "original-width-infinite": (region_body(media, keypoint(25, 50, original_width=float("inf"))), "original size"),
        "image-rotation-string": (region_body(media, keypoint(25, 50, image_rotation="upside down")), "image_rotation"),
        "regions-not-a-list": ({**predict_body(media.url + "/img.png", None), "params": {"context": {"result": "x"}}},
                               "params.context"),
        "region-not-an-object": (predict_body(media.url + "/img.png", ["kp"]), "must be an object"),
    }


BAD_INPUT_CASES = [
    "image-number", "image-list", "image-object", "image-empty", "x-string", "y-list", "x-nan", "x-huge",
    "width-string", "width-negative", "height-nan", "rotation-string", "rotation-nan", "original-width-string",
    "original-width-negative", "original-width-nan", "original-width-infinite", "image-rotation-string",
    "regions-not-a-list", "region-not-an-object",
]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_a_400_and_the_next_click_works(served, media, case):
    client, _ = served
    cases = bad_inputs(media)
    assert sorted(cases) == sorted(BAD_INPUT_CASES)
    body, message = cases[case]
    response = client.post("/predict", json=body)
    assert response.status_code == 400, response.get_json()
    assert message in response.get_json()["error"]
    assert_next_click_works(client, media)
