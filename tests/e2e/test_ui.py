"""An annotator's click in Label Studio's editor becomes a SAM mask: Debian's Chromium, driven by Playwright.

The browser is Debian's ``/usr/bin/chromium`` (never one Playwright downloads).
The test logs in through the login form, opens a task in the labeling view,
turns on Auto-Annotation, picks the smart keypoint tool for the "Object" label,
clicks on the disc of a generated scene, waits for the mask to come back as a
suggestion, accepts it, and submits. It checks the request the editor sent,
the mask the backend answered, and the brush region Label Studio stored; the
screenshot of the mask on the canvas is kept under the artifacts directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import E2EError, make_project
from sam_backend.sam.synthetic import iou
from scenes import decode_brush

CHROMIUM = os.environ.get("SAM_E2E_CHROMIUM", "/usr/bin/chromium")
# Headless, and nothing that reaches outside: this machine's network is closed.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 120_000  # the editor's bundle and a first encode on two busy CPUs


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        raise E2EError(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver (tests/e2e/run.sh does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture()
def page(browser, artifacts):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    # Whatever happened, keep what the annotator would have seen last (and the DOM, to fix selectors).
    page.screenshot(path=str(artifacts / "ui-last-state.png"))
    (artifacts / "ui-last-state.html").write_text(page.content())
    context.close()


def log_in(page, label_studio) -> None:
    page.goto(label_studio.url + "/user/login/", wait_until="domcontentloaded")
    page.fill("input[name=email]", label_studio.email)
    page.fill("input[name=password]", label_studio.password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url, wait_until="domcontentloaded")


def open_task(page, label_studio, project_id: int, task_id: int):
    """The labeling view of one task; returns the editor's image element once it has loaded."""
    page.goto(f"{label_studio.url}/projects/{project_id}/data?task={task_id}", wait_until="domcontentloaded")
    image = page.locator("img[alt=image]")  # the <Image name="image"> of label_config.xml
    image.wait_for(state="attached")
    page.wait_for_function(
        "() => { const i = document.querySelector('img[alt=image]'); return i && i.complete && i.naturalWidth > 0; }"
    )
    return image


def turn_on_auto_annotation(page) -> None:
    toggle = page.get_by_test_id("bottombar-auto-annotation-toggle")
    page.locator("label", has=toggle).click()  # the input itself is visually hidden under the toggle
    assert toggle.is_checked()


def pick_smart_keypoint(page, label: str = "Object") -> None:
    """The "Object" label of the <KeyPointLabels> (second label group in label_config.xml), then the smart tool."""
    page.locator(".lsf-labels").nth(1).locator(".lsf-label", has_text=label).click()
    # Smart tools sit in a flyout of the toolbar's last group, shown on hover.
    page.locator("button.lsf-tool_smart:not([aria-label])").hover()
    tool = page.locator(".lsf-toolbar__smart button[aria-label=key-point-tool]")
    tool.click()
    assert "lsf-tool_active" in (tool.get_attribute("class") or "")


def screen_point(image, x: float, y: float) -> tuple[float, float]:
    """Page coordinates of image pixel ``(x, y)``: the element's box already includes the editor's zoom/offset."""
    natural_width, natural_height, left, top, width, height = image.evaluate(
        "i => { const r = i.getBoundingClientRect(); return [i.naturalWidth, i.naturalHeight, r.x, r.y, r.width, r.height]; }"
    )
    return left + x * width / natural_width, top + y * height / natural_height


def test_a_click_with_the_smart_keypoint_becomes_a_brush_mask(label_studio, backend, images, page, artifacts):
    shapes = images["landscape.jpg"]
    # A project of its own: no drafts or predictions from the API tests in the editor.
    project = make_project(label_studio, backend, "sam-backend e2e UI", {"landscape.jpg": shapes})
    task_id = project.tasks["landscape.jpg"]["id"]

    log_in(page, label_studio)
    image = open_task(page, label_studio, project.id, task_id)
    natural = image.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert natural == [shapes.width, shapes.height]
    turn_on_auto_annotation(page)
    pick_smart_keypoint(page)

    with page.expect_response(lambda r: r.url.endswith("/interactive-annotating")) as answered:
        page.mouse.click(*screen_point(image, *shapes.click()))
    response = answered.value
    sent = response.request.post_data_json
    assert sent["task"] == task_id
    (keypoint,) = sent["context"]["result"]
    assert keypoint["type"] == "keypointlabels" and keypoint["value"]["keypointlabels"] == ["Object"]
    assert keypoint.get("is_positive", True) is True
    assert (keypoint["original_width"], keypoint["original_height"]) == (shapes.width, shapes.height)
    clicked = (keypoint["value"]["x"] * shapes.width / 100, keypoint["value"]["y"] * shapes.height / 100)
    assert shapes.disc[int(clicked[1]), int(clicked[0])], f"the click landed at {clicked}, off the disc"

    body = response.json()
    assert "errors" not in body, body
    (region,) = body["data"]["result"]
    mask = decode_brush(region)
    assert mask[int(clicked[1]), int(clicked[0])]
    assert iou(mask, shapes.disc) > 0.6

    # The editor shows the mask as a suggestion; accepting it puts a brush region in the regions list
    # (in place of the smart keypoint, which only served as the prompt).
    page.locator(".lsf-auto-accept__info", has_text="1 suggestions").wait_for()
    page.get_by_test_id("bottombar-accept-suggestions-button").click()
    page.locator(".lsf-tree__node_type_brushregion", has_text="Object").wait_for()
    page.wait_for_timeout(500)  # let the canvas paint the mask before the picture
    screenshot = artifacts / "ui-smart-keypoint-mask.png"
    page.screenshot(path=str(screenshot))
    print(f"\nscreenshot of the mask in Label Studio's editor: {screenshot}")

    with page.expect_response(lambda r: "/annotations" in r.url and r.request.method == "POST") as saved:
        page.get_by_test_id("bottombar-submit-button").click()
    assert saved.value.ok, saved.value.text()
    (annotation,) = label_studio.api("GET", f"/api/tasks/{task_id}/annotations/").json()
    brushes = [r for r in annotation["result"] if r["type"] == "brushlabels"]
    assert len(brushes) == 1, annotation["result"]
    stored = decode_brush(brushes[0])
    assert stored.shape == shapes.size and iou(stored, shapes.disc) > 0.6
