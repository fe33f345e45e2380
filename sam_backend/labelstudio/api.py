"""A Label Studio project through label-studio-sdk: its tasks, its label config, its predictions.

Jobs that work outside a request (``sam-backend preannotate``, ``precompute``,
predictions finished after ``/predict``'s budget) talk to Label Studio here.
The SDK retries refused connections, 5xx and 429 answers with exponential
backoff; timeouts are retried here too, and what still fails becomes a
:class:`LabelStudioError` that says what to check.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

from sam_backend.errors import SamBackendError

logger = logging.getLogger(__name__)

#: Attempts per call (the SDK's own backoff: 1 s, 2 s, 4 s...).
DEFAULT_RETRIES = 5


class LabelStudioError(SamBackendError):
    """Label Studio refused a call or could not be reached."""


@dataclass
class RunSummary:
    """What a command run over a project's tasks did; commands add their own counts.

    Attributes:
        failed: ``{task id: reason}``.
        interrupted: stopped early (Ctrl-C, or Label Studio failing); running again resumes.
        seconds: how long the run took.
    """

    failed: dict = field(default_factory=dict)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0: all done; 1: some tasks failed; 130: interrupted."""
        return 130 if self.interrupted else 1 if self.failed else 0


def _as_dict(item) -> dict:
    if isinstance(item, dict):
        return item
    dump = getattr(item, "model_dump", None) or getattr(item, "dict")
    return dump()


class LabelStudioProject:
    """One project of a Label Studio server.

    Args:
        url: Label Studio's address, e.g. ``http://localhost:8080``.
        api_key: a personal access token (or a legacy token where enabled).
        project: the project id.
        retries: attempts per call for connection errors, timeouts, 5xx and 429.
        timeout: seconds per HTTP request.

    Example:
        >>> ls = LabelStudioProject("http://localhost:8080", "<token>", 3)  # doctest: +SKIP
        >>> for task in ls.iter_tasks():  # doctest: +SKIP
        ...     print(task["id"], task["data"]["image"])
        >>> ls.create_predictions([{"task": 7, "result": [], "model_version": "demo"}])  # doctest: +SKIP
    """

    def __init__(self, url: str, api_key: str, project: int, retries: int = DEFAULT_RETRIES, timeout: float = 60.0):
        if not url or not api_key:
            raise LabelStudioError(
                "Label Studio's URL and an API key are needed (--url and --api-key, or "
                "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)."
            )
        from label_studio_sdk.client import LabelStudio

        self.url = url.rstrip("/")
        self.project = int(project)
        self.retries = retries
        self.client = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout)

    def _call(self, what: str, function, *args, **kwargs):
        """``function(*args, **kwargs)`` with retries on timeouts; errors as :class:`LabelStudioError`."""
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        kwargs.setdefault("request_options", {"max_retries": self.retries})
        for attempt in range(self.retries + 1):
            try:
                return function(*args, **kwargs)
            except httpx.TimeoutException as exc:
                if attempt == self.retries:
                    raise LabelStudioError(f"Label Studio at {self.url} did not answer in time to {what}: {exc}") from exc
                delay = min(2.0**attempt, 30.0)
                logger.warning("Label Studio timed out to %s; retrying in %.0fs", what, delay)
                time.sleep(delay)
            except ApiError as exc:
                raise LabelStudioError(_explain(exc, what, self.url, self.project)) from exc
            except httpx.HTTPError as exc:
                raise LabelStudioError(f"Cannot reach Label Studio at {self.url} to {what}: {exc}") from exc
        raise AssertionError("unreachable")

    def label_config(self) -> str:
        """The project's label config XML."""
        project = self._call(f"read project {self.project}", self.client.projects.get, id=self.project)
        return project.label_config or ""

    def count_tasks(self, view: int | None = None) -> int:
        """How many tasks the project (or one of its data manager views) has."""
        pager = self._call("count tasks", self.client.tasks.list, project=self.project, view=view, page_size=1)
        return int(getattr(pager.response, "total", 0) or 0)

    def iter_tasks(self, view: int | None = None, page_size: int = 100) -> Iterator[dict]:
        """Every task with its data, annotations and predictions, page by page (in id order)."""
        yield from self._paged("list tasks", page_size, view=view, fields="all")

    def tasks_after(self, task_id: int, page_size: int = 20) -> Iterator[dict]:
        """The tasks whose id is above ``task_id``, in id order, page by page; data and ``is_labeled``, no annotations.

        The labeling stream's default (sequential) order. Label Studio filters
        and orders them itself (a data manager query on ``/api/tasks``), so a
        project of a million tasks is read a page at a time from where the
        annotator is. Read-only, unlike ``/api/projects/{id}/next``, which
        locks the task it gives to the caller.
        """
        query = json.dumps({
            "filters": {"conjunction": "and", "items": [
                {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": int(task_id)},
            ]},
            "ordering": ["tasks:id"],
        })
        yield from self._paged("list the next tasks", page_size, query=query, fields="task_only")

    def annotated_tasks(self, page_size: int = 100) -> Iterator[dict]:
        """The tasks with at least one annotation, with their annotations, in id order, page by page."""
        query = json.dumps({
            "filters": {"conjunction": "and", "items": [
                {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0},
            ]},
            "ordering": ["tasks:id"],
        })
        yield from self._paged("list the annotated tasks", page_size, query=query, fields="all")

    def _paged(self, what: str, page_size: int, **params) -> Iterator[dict]:
        seen, number = 0, 1
        while True:
            try:
                page = self._call(what, self.client.tasks.list, project=self.project, page=number,
                                  page_size=page_size, **params)
            except LabelStudioError as exc:
                # Label Studio answers 404 for the page after the last one.
                if number > 1 and getattr(exc.__cause__, "status_code", None) == 404:
                    return
                raise
            items = page.items or []
            for item in items:
                yield _as_dict(item)
            seen += len(items)
            total = getattr(page.response, "total", None)
            if not items or (total is not None and seen >= total):
                return
            number += 1

    def create_predictions(self, predictions: list[dict]) -> int:
        """Upload predictions (``task``, ``result``, ``score``, ``model_version``) in one request."""
        if not predictions:
            return 0
        tasks = [str(p.get("task")) for p in predictions]
        # Errors name the tasks: a late prediction that fails is logged with this message.
        named = ", ".join(tasks[:20]) + (f" and {len(tasks) - 20} more" if len(tasks) > 20 else "")
        self._call(
            f"upload {len(predictions)} prediction(s) (task(s) {named})",
            self.client.projects.import_predictions,
            id=self.project,
            request=predictions,
        )
        return len(predictions)

    def delete_prediction(self, prediction_id: int) -> None:
        """Delete one prediction (``--overwrite`` replaces our own)."""
        self._call(f"delete prediction {prediction_id}", self.client.predictions.delete, id=prediction_id)


def _explain(exc, what: str, url: str, project: int) -> str:
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    detail = body.get("detail") if isinstance(body, dict) else body
    if status == 401:
        hint = "the API key was refused: use a personal access token (Account & Settings), or a legacy token where enabled"
    elif status == 403:
        hint = "the token's user may not do this in this project"
    elif status == 404:
        hint = f"no project {project} (or no such object) at {url}"
    else:
        hint = f"Label Studio answered {status}"
    return f"Label Studio refused to {what}: {hint}" + (f" ({detail})" if detail else "") + "."
