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

from harness import Backend, LabelStudio, Project, artifacts_dir, label_studio_venv, make_project  # noqa: E402
from scenes import SceneImage, build_images  # noqa: E402

DEMO_PRESET = "demo"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = artifacts_dir()
    print(f"\ne2e artifacts (screenshots, server logs): {path}")
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
    print(f"\nLabel Studio {ls.url} started in {time.monotonic() - started:.0f}s (log: {log})")
    yield ls
    ls.stop()


@pytest.fixture(scope="session")
def backend(label_studio, tmp_path_factory, artifacts) -> Backend:
    """``sam-backend serve --preset demo`` with the user's personal access token, as the README says."""
    log = artifacts / "sam-backend.log"
    log.write_text("")
    started = time.monotonic()
    served = Backend.launch(DEMO_PRESET, label_studio, tmp_path_factory.mktemp("sam-backend"), log)
    print(f"\nsam-backend {served.url} ready in {time.monotonic() - started:.0f}s (log: {log})")
    yield served
    served.stop()


@pytest.fixture(scope="session")
def images() -> dict[str, SceneImage]:
    return build_images()


@pytest.fixture(scope="session")
def project(label_studio, backend, images) -> Project:
    return make_project(label_studio, backend, "sam-backend e2e", images)


def pytest_terminal_summary(terminalreporter) -> None:
    """Say where the screenshots and server logs are, pass or fail."""
    path = artifacts_dir()
    terminalreporter.write_sep("-", "e2e artifacts")
    for item in sorted(path.iterdir()):
        terminalreporter.write_line(str(item))
