"""Processes and clients for the end-to-end tests: a real Label Studio, ``sam-backend serve``.

Everything runs on 127.0.0.1 on free ports, each server in its own process
group (so stopping it also stops its children: gunicorn workers, Django's
threads), with its log kept under the artifacts directory for post-mortems.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

E2E_DIR = Path(__file__).resolve().parent
REPO = E2E_DIR.parents[1]
LABEL_CONFIG = (REPO / "label_config.xml").read_text()

#: How long Label Studio may take to migrate a fresh database and start (2 slow CPUs).
LS_START_TIMEOUT = float(os.environ.get("SAM_E2E_LS_START_TIMEOUT", "600"))
BACKEND_START_TIMEOUT = float(os.environ.get("SAM_E2E_BACKEND_START_TIMEOUT", "300"))


class E2EError(RuntimeError):
    """The harness could not do its part (install, start, log in): the run must fail, never skip."""


def free_port() -> int:
    """A port nobody listens on now (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def artifacts_dir() -> Path:
    """Where screenshots and server logs are kept: ``$SAM_E2E_ARTIFACTS`` or ``tests/e2e/artifacts``."""
    path = Path(os.environ.get("SAM_E2E_ARTIFACTS") or E2E_DIR / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def label_studio_venv() -> Path:
    """Label Studio's own virtualenv: ``$SAM_E2E_LS_VENV``, else installed (or found cached) now."""
    given = os.environ.get("SAM_E2E_LS_VENV")
    if given:
        venv = Path(given)
    else:
        done = subprocess.run([str(E2E_DIR / "labelstudio.sh"), "install"], stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise E2EError("tests/e2e/labelstudio.sh install failed (see its output above)")
        venv = Path(done.stdout.strip().splitlines()[-1])
    if not (venv / "bin" / "label-studio").exists():
        raise E2EError(f"{venv} has no bin/label-studio; remove it and run tests/e2e/labelstudio.sh install")
    return venv


@dataclass
class ServerProcess:
    """A server started in its own session (process group), its output in ``log``."""

    name: str
    argv: list[str]
    env: dict
    log: Path
    process: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        handle = open(self.log, "ab")
        handle.write(f"\n==== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
        handle.flush()
        self.process = subprocess.Popen(
            self.argv, stdout=handle, stderr=subprocess.STDOUT, env=self.env,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
        )
        handle.close()
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the whole group, SIGKILL what is left after ``timeout``; idempotent."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; children of the group may still linger.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        self.process = None

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the test process dies without its finalizers (SIGKILL, OOM)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def wait_for(predicate, timeout: float, what: str, server: ServerProcess | None = None, interval: float = 0.5):
    """Poll ``predicate`` until it returns a truthy value; fail with the server's log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and not server.alive():
            raise E2EError(f"{server.name} exited while waiting for {what}:\n{server.tail()}")
        try:
            value = predicate()
        except requests.RequestException:
            value = None
        if value:
            return value
        time.sleep(interval)
    raise E2EError(f"timed out after {timeout:.0f}s waiting for {what}" + (f":\n{server.tail()}" if server else ""))


# ----------------------------------------------------------------- Label Studio


@dataclass
class LabelStudio:
    """A Label Studio server with one user, logged in, and that user's personal access token."""

    url: str
    email: str
    password: str
    data_dir: Path
    server: ServerProcess
    session: requests.Session = field(default_factory=requests.Session)
    personal_token: str | None = None
    _access: tuple[str, float] | None = None

    @classmethod
    def launch(cls, venv: Path, data_dir: Path, log: Path) -> "LabelStudio":
        port = free_port()
        email, password = "e2e@example.com", "e2e-Password-1234"
        # Label Studio reads LABEL_STUDIO_*, DJANGO_* and more from the environment: none of the developer's.
        env = {
            name: value for name, value in os.environ.items()
            if not name.startswith(("LABEL_STUDIO_", "DJANGO_", "SAM_", "KERAS_"))
        }
        env.update(
            LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
            # Some of its files go under ~/.local/share whatever the data dir: keep them in the temp dir too.
            HOME=str(data_dir),
            DJANGO_DB="sqlite",
            # Label Studio refuses loopback ML backend URLs otherwise (SSRF protection).
            USE_DEFAULT_BANNED_SUBNETS="false",
            LATEST_VERSION_CHECK="false",
            COLLECT_ANALYTICS="false",
            LABEL_STUDIO_USERNAME=email,
            LABEL_STUDIO_PASSWORD=password,
            # Label Studio must not pick up our test environment's Python packages.
            PYTHONPATH="",
            VIRTUAL_ENV=str(venv),
            PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        argv = [str(venv / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
                "--port", str(port), "--data-dir", str(data_dir)]
        server = ServerProcess("Label Studio", argv, env, log).start()
        ls = cls(url=f"http://127.0.0.1:{port}", email=email, password=password, data_dir=data_dir, server=server)
        try:
            wait_for(lambda: requests.get(ls.url + "/health", timeout=2).ok, LS_START_TIMEOUT,
                     "Label Studio's /health", server, interval=1.0)
            ls.login()
            ls.create_personal_token()
        except BaseException:
            server.stop()
            raise
        return ls

    def stop(self) -> None:
        self.server.stop()

    def login(self) -> None:
        """Log in through the login form, as a person does (CSRF cookie, then the form post)."""
        self.session.get(self.url + "/user/login/", timeout=30).raise_for_status()
        response = self.session.post(
            self.url + "/user/login/",
            data={"email": self.email, "password": self.password,
                  "csrfmiddlewaretoken": self.session.cookies.get("csrftoken", "")},
            headers={"Referer": self.url + "/user/login/"}, allow_redirects=False, timeout=30,
        )
        if response.status_code != 302:
            raise E2EError(f"login to Label Studio failed: HTTP {response.status_code}")

    def create_personal_token(self) -> str:
        """``POST /api/token/`` from the logged-in session (Account & Settings → Personal Access Token)."""
        response = self.session.post(
            self.url + "/api/token/", json={}, timeout=30,
            headers={"X-CSRFToken": self.session.cookies.get("csrftoken", ""), "Referer": self.url + "/"},
        )
        if response.status_code != 201:
            raise E2EError(f"creating a personal access token failed: HTTP {response.status_code} {response.text}")
        self.personal_token = response.json()["token"]
        return self.personal_token

    def access_token(self) -> str:
        """A short-lived access token from the personal access token (refreshed before it expires)."""
        if self._access and self._access[1] > time.time() + 30:
            return self._access[0]
        response = requests.post(self.url + "/api/token/refresh/", json={"refresh": self.personal_token}, timeout=30)
        response.raise_for_status()
        access = response.json()["access"]
        payload = access.split(".")[1]
        expires = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]
        self._access = (access, float(expires))
        return access

    def api(self, method: str, path: str, expect: int | tuple[int, ...] | None = (200, 201, 204), **kwargs):
        """Call Label Studio's API with ``Authorization: Bearer``; check the status unless ``expect`` is None."""
        kwargs.setdefault("timeout", 300)
        headers = {"Authorization": f"Bearer {self.access_token()}", **kwargs.pop("headers", {})}
        response = requests.request(method, self.url + path, headers=headers, **kwargs)
        if expect is not None:
            expected = (expect,) if isinstance(expect, int) else expect
            assert response.status_code in expected, f"{method} {path} -> {response.status_code}: {response.text[:2000]}"
        return response

    # -------------------------------------------------------------- helpers

    def create_project(self, title: str, label_config: str = LABEL_CONFIG) -> dict:
        return self.api("POST", "/api/projects", json={"title": title, "label_config": label_config}).json()

    def import_files(self, project_id: int, files: dict[str, bytes]) -> dict[str, dict]:
        """Upload image files as the Import dialog does; returns the created tasks by file name."""
        # One form field per file: Label Studio reads request.FILES by field name.
        uploads = [(name, (name, data)) for name, data in files.items()]
        self.api("POST", f"/api/projects/{project_id}/import", files=uploads)
        tasks = self.tasks(project_id)
        by_name = {}
        for name in files:
            matches = [t for t in tasks if t["data"]["image"].endswith("-" + name)]
            assert len(matches) == 1, f"{name}: {[t['data'] for t in tasks]}"
            by_name[name] = matches[0]
        return by_name

    def tasks(self, project_id: int) -> list[dict]:
        body = self.api("GET", f"/api/tasks?project={project_id}&page_size=1000&fields=all").json()
        return body["tasks"] if isinstance(body, dict) else body

    def connect_backend(self, project_id: int, url: str, title: str = "SAM") -> dict:
        """*Settings → Model → Connect Model* with *Interactive preannotations* on."""
        return self.api("POST", "/api/ml", json={
            "url": url, "project": project_id, "title": title, "is_interactive": True,
        }).json()

    def interactive(self, ml_id: int, task_id: int, regions: list[dict]) -> dict:
        """What the editor posts when a smart region is finished (``lsf:regionFinishedDrawing``)."""
        return self.api("POST", f"/api/ml/{ml_id}/interactive-annotating",
                        json={"task": task_id, "context": {"result": regions}}).json()

    def upload_path(self, image_url: str) -> Path:
        """The file behind a ``/data/upload/<project>/<name>`` task URL in the data directory."""
        relative = image_url.split("/data/upload/", 1)[1]
        return self.data_dir / "media" / "upload" / relative


# ------------------------------------------------------------------ sam-backend


@dataclass
class Backend:
    """``sam-backend serve`` (gunicorn), as users run it, on a fixed loopback port."""

    server: ServerProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def launch(cls, preset: str, ls: LabelStudio, workdir: Path, log: Path, settings: dict | None = None) -> "Backend":
        port = free_port()
        exe = shutil.which("sam-backend", path=str(Path(sys.executable).parent)) or shutil.which("sam-backend")
        if not exe:
            raise E2EError("no sam-backend command: install the package (pip install -e '.[test,e2e]')")
        # The defaults a user gets: none of the developer's own settings (SAM_CACHE_DIR, basic auth...).
        env = {
            name: value for name, value in os.environ.items()
            if not name.startswith(("SAM_", "BASIC_AUTH_", "LABEL_STUDIO_"))
            and name not in ("WORKERS", "THREADS", "PORT", "HOST", "MODEL_DIR")
        }
        env.update(LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.personal_token,
                   MODEL_DIR=str(workdir), LOG_LEVEL="INFO")
        env.update(settings or {})  # what a test sets on purpose
        argv = [exe, "serve", "--preset", preset, "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1", "--threads", "4"]
        backend = cls(ServerProcess("sam-backend", argv, env, log), port)
        backend.start()
        return backend

    def start(self) -> None:
        """Start the server (again, after :meth:`stop`) on its port and wait for its model."""
        wait_for(lambda: not _listening(self.port), 30, f"port {self.port} to be free")
        self.server.start()
        try:
            self.wait_ready()
        except BaseException:
            self.server.stop()
            raise

    def health(self) -> dict:
        return requests.get(self.url + "/health", timeout=2).json()

    def wait_ready(self) -> dict:
        def ready():
            body = self.health()
            if body.get("model_state") == "failed":
                raise E2EError(f"sam-backend failed to load its model: {body.get('error')}")
            return body if body.get("model_state") == "ready" else None

        return wait_for(ready, BACKEND_START_TIMEOUT, "sam-backend's model", self.server)

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        """Stop and start again on the same port, as after a crash or a deploy."""
        self.stop()
        self.start()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ------------------------------------------------------------------- a project


@dataclass
class Project:
    """A Label Studio project with our label config, the uploaded scenes, and the backend connected."""

    id: int
    ml: dict
    tasks: dict[str, dict]  # by file name
    images: dict


def make_project(ls: LabelStudio, backend: Backend, title: str, images: dict) -> Project:
    project = ls.create_project(title)
    tasks = ls.import_files(project["id"], {name: image.data for name, image in images.items()})
    ml = ls.connect_backend(project["id"], backend.url)
    return Project(project["id"], ml, tasks, images)
