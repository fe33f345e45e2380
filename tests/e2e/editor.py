"""Driving Label Studio's editor in Debian's Chromium (Playwright): logging in, opening a task, picking tools.

The ``browser`` and ``page`` fixtures are in ``conftest.py``.
"""

from __future__ import annotations

import os

CHROMIUM = os.environ.get("SAM_E2E_CHROMIUM", "/usr/bin/chromium")
# Headless, and nothing that reaches outside: this machine's network is closed.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 120_000  # the editor's bundle and a first encode on two busy CPUs


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


def pick_smart_tool(page, group: int, label: str, tool: str, nth: int = 0) -> None:
    """A label of the config's ``group``-th labels control (0-based), then the ``nth`` smart ``tool``.

    ``tool`` is the tool's ``aria-label``: ``key-point-tool``, ``rectangle-tool``;
    each smart control has its own, in config order.
    """
    page.locator(".lsf-labels").nth(group).locator(".lsf-label", has_text=label).click()
    # Smart tools sit in a flyout of the toolbar's last group, shown on hover.
    page.locator("button.lsf-tool_smart:not([aria-label])").hover()
    button = page.locator(f".lsf-toolbar__smart button[aria-label={tool}]").nth(nth)
    button.click()
    assert "lsf-tool_active" in (button.get_attribute("class") or "")


def pick_smart_keypoint(page, label: str = "Object") -> None:
    """The "Object" label of the <KeyPointLabels> (second label group in label_config.xml), then the smart tool."""
    pick_smart_tool(page, 1, label, "key-point-tool")


def screen_point(image, x: float, y: float) -> tuple[float, float]:
    """Page coordinates of image pixel ``(x, y)``: the element's box already includes the editor's zoom/offset."""
    natural_width, natural_height, left, top, width, height = image.evaluate(
        "i => { const r = i.getBoundingClientRect(); return [i.naturalWidth, i.naturalHeight, r.x, r.y, r.width, r.height]; }"
    )
    return left + x * width / natural_width, top + y * height / natural_height
