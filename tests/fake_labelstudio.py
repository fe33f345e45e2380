"""A small Label Studio API on loopback, for the parts label-studio-sdk calls.

It serves what ``sam_backend.labelstudio.api`` and ``MediaFetcher`` use: a project
with its label config, paged ``/api/tasks`` (with predictions), prediction
import and deletion, and uploaded files under ``/data/upload/``. Answers
follow Label Studio 1.23's shapes (a 404 for the page after the last one, a
401 without the token). The real server is exercised in ``tests/e2e``.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

from flask import Flask, abort, jsonify, request, send_from_directory
from werkzeug.serving import make_server


class FakeLabelStudio:
    """Projects, tasks and predictions in memory, served on ``self.url``.

    Attributes:
        tasks: ``{project: [task, ...]}``; each task's ``predictions`` grow as they are posted.
        fail_imports: the next N prediction imports answer 503 (the SDK retries them).
        fail_lists: ``{project: status}``: the project's task list answers that status.
        hang_imports: seconds a prediction import hangs before it answers 504 without importing
            (Label Studio stuck; a client with a shorter timeout gives up first).
        requests: ``(method, path)`` of every request.
        times: when each of ``requests`` came (``time.monotonic()``).
    """

    def __init__(self, files: Path, token: str = "ls-token", label_config: str = ""):
        self.files, self.token, self.label_config = Path(files), token, label_config
        self.tasks: dict[int, list[dict]] = {}
        self.fail_imports = 0
        self.hang_imports = 0.0
        self.fail_lists: dict[int, int] = {}
        self.requests: list[tuple[str, str]] = []
        self.times: list[float] = []
        self._ids = itertools.count(1000)
        self._lock = threading.Lock()
        app = Flask("fake_labelstudio")

        @app.before_request
        def check_token():
            with self._lock:  # the two lists stay in step
                self.times.append(time.monotonic())
                self.requests.append((request.method, request.path))
            if request.headers.get("Authorization") != f"Token {self.token}":
                return jsonify(detail="Authentication credentials were not provided."), 401
            return None

        @app.get("/api/projects/<int:project>/")
        @app.get("/api/projects/<int:project>")
        def project_detail(project):
            if project not in self.tasks:
                abort(404)
            return jsonify(id=project, title=f"project {project}", label_config=self.label_config)

        @app.get("/api/tasks/")
        @app.get("/api/tasks")
        def list_tasks():
            project = int(request.args["project"])
            page, size = int(request.args.get("page", 1)), int(request.args.get("page_size", 100))
            if project in self.fail_lists:
                return jsonify(detail="unavailable"), self.fail_lists[project]
            tasks = [{**task, "is_labeled": bool(task.get("is_labeled", task["annotations"]))}
                     for task in self.tasks.get(project, [])]
            tasks = _data_manager_query(tasks, request.args.get("query"))
            predictions = sum(len(t["predictions"]) for t in tasks)
            if request.args.get("fields") == "task_only":
                tasks = [{k: v for k, v in task.items() if k not in ("annotations", "predictions")} for task in tasks]
            chunk = tasks[(page - 1) * size : page * size]
            if page > 1 and not chunk:
                return jsonify(detail="Invalid page."), 404
            return jsonify(tasks=chunk, total=len(tasks), total_annotations=0, total_predictions=predictions)

        @app.post("/api/projects/<int:project>/import/predictions")
        def import_predictions(project):
            if self.hang_imports:
                time.sleep(self.hang_imports)
                return jsonify(detail="stuck"), 504
            with self._lock:
                if self.fail_imports > 0:
                    self.fail_imports -= 1
                    return jsonify(detail="busy"), 503
                by_id = {t["id"]: t for t in self.tasks.get(project, [])}
                for item in request.get_json():
                    prediction = {"id": next(self._ids), "project": project, **item}
                    by_id[item["task"]]["predictions"].append(prediction)
            return jsonify(created=len(request.get_json())), 201

        @app.delete("/api/predictions/<int:prediction>/")
        @app.delete("/api/predictions/<int:prediction>")
        def delete_prediction(prediction):
            with self._lock:
                for task in itertools.chain(*self.tasks.values()):
                    task["predictions"] = [p for p in task["predictions"] if p["id"] != prediction]
            return "", 204

        @app.get("/data/upload/<path:name>")
        def upload(name):
            return send_from_directory(self.files, name)

        @app.get("/storage-data/uploaded/")
        def uploaded():
            # Label Studio 1.23's address for uploads; /data/upload/ is the older one.
            return send_from_directory(self.files, request.args["filepath"].removeprefix("upload/"))

        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def add_task(self, project: int, image: str, **fields) -> dict:
        """A task whose image is ``/data/upload/<image>``."""
        task = {"id": next(self._ids), "project": project, "data": {"image": f"/data/upload/{image}"},
                "annotations": [], "predictions": [], **fields}
        self.tasks.setdefault(project, []).append(task)
        return task

    def predictions(self, project: int) -> list[dict]:
        """Every prediction of the project."""
        return [p for t in self.tasks.get(project, []) for p in t["predictions"]]

    def close(self) -> None:
        self._server.shutdown()


def _data_manager_query(tasks: list[dict], query: str | None) -> list[dict]:
    """The part of Label Studio's data manager ``query`` that the backend sends: id and annotation-count filters, id ordering."""
    if not query:
        return tasks
    import json

    parsed = json.loads(query)
    compare = {"greater": lambda a, b: a > b, "less": lambda a, b: a < b, "equal": lambda a, b: a == b}
    columns = {"filter:tasks:id": lambda task: task["id"],
               "filter:tasks:total_annotations": lambda task: len(task.get("annotations") or [])}
    for item in (parsed.get("filters") or {}).get("items", []):
        assert item["filter"] in columns and item["type"] == "Number", item
        column = columns[item["filter"]]
        tasks = [task for task in tasks if compare[item["operator"]](column(task), item["value"])]
    for key in reversed(parsed.get("ordering") or []):
        assert key.lstrip("-") == "tasks:id", key
        tasks = sorted(tasks, key=lambda task: task["id"], reverse=key.startswith("-"))
    return tasks
