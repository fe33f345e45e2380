"""Fixtures of the end-to-end tests: a real Label Studio, ``sam-backend serve --preset demo``, a project.

Run with ``tests/e2e/run.sh`` (installs what is missing) or ``python -m pytest -q tests/e2e``.
Nothing here is mocked and nothing is skipped: a missing Label Studio or
Chromium fails the run. Both servers are stopped at the end of the session,
also when a test fails or the run is interrupted (fixture finalizers, process
groups). Their logs are kept under the artifacts directory.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from editor import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS  # noqa: E402
from harness import (Backend, E2EError, LabelStudio, Project, artifacts_dir, label_studio_venv,  # noqa: E402
                     make_project)
from scenes import SceneImage, build_images  # noqa: E402

DEMO_PRESET = "demo"


#: What the run took, reported at the end (pytest hides fixture output of passing tests).
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = artifacts_dir()
    # No stale screenshot from an earlier run may pass for this run's.
    for old in [*path.glob("ui-*.png"), *path.glob("ui-*.html")]:
        old.unlink()
    return path


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory, artifacts) -> LabelStudio:
    """Label Studio from its own virtualenv, on loopback, with a fresh data directory and user."""
    venv = label_studio_venv()
    data_dir = tmp_path_factory.mktemp("label-studio-data")
    log = artifacts / "label-studio.log"
    log.write_text("")
    started = time.monotonic()
    ls = LabelStudio.launch(venv, data_dir, log)
    TIMINGS["Label Studio start (migrations, user, token)"] = time.monotonic() - started
    yield ls
    ls.stop()


@pytest.fixture(scope="session")
def backend(label_studio, tmp_path_factory, artifacts) -> Backend:
    """``sam-backend serve --preset demo`` with the user's personal access token, as the README says."""
    log = artifacts / "sam-backend.log"
    log.write_text("")
    started = time.monotonic()
    served = Backend.launch(DEMO_PRESET, label_studio, tmp_path_factory.mktemp("sam-backend"), log)
    TIMINGS["sam-backend serve --preset demo, until ready"] = time.monotonic() - started
    yield served
    served.stop()


@pytest.fixture(scope="session")
def images() -> dict[str, SceneImage]:
    return build_images()


@pytest.fixture(scope="session")
def project(label_studio, backend, images) -> Project:
    return make_project(label_studio, backend, "sam-backend e2e", images)


@pytest.fixture(scope="session")
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


def pytest_terminal_summary(terminalreporter) -> None:
    """Say where the screenshots and server logs are, pass or fail."""
    path = artifacts_dir()
    terminalreporter.write_sep("-", "e2e artifacts")
    for item in sorted(path.iterdir()):
        terminalreporter.write_line(str(item))
    for what, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{what}: {seconds:.0f} s")
