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

from editor import log_in, open_task, pick_smart_keypoint, screen_point, turn_on_auto_annotation
from harness import make_project
from sam_backend.sam.synthetic import iou
from scenes import decode_brush


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
