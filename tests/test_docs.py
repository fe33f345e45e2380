"""The documentation cannot drift from the code: every environment variable documented, every link alive."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION = ROOT / "docs" / "configuration.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Calls that read a variable named by their first argument: os.getenv and the package's helpers.
_ENV_HELPERS = {"getenv", "env_number", "_env_int"}
#: Methods of ``os.environ`` (or a mapping standing in for it) that read a variable.
_ENVIRON_METHODS = {"get", "setdefault", "pop"}
_NAME = re.compile(r"^[A-Z][A-Z0-9_]*[A-Z0-9]$")
_OURS = re.compile(r"^SAM_[A-Z0-9_]*[A-Z0-9]$")


def _receiver(node: ast.AST) -> str:
    return getattr(node, "attr", getattr(node, "id", ""))


def variables_read(package: Path) -> dict[str, str]:
    """Every environment variable the package's code names, with a file that names it.

    Found where the code reads one (``os.environ.get("X")``, ``os.environ["X"]``,
    ``os.getenv("X")``, ``env_number("X")``...), where a module names one in a
    constant (``ENV_VAR = "X"``), and every string that is a whole ``SAM_...``
    name (settings read from a mapping of the environment). Names that start
    with ``_`` are the package's own bookkeeping, not settings.
    """
    found: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = None
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                on_environ = isinstance(func, ast.Attribute) and _receiver(func.value) == "environ"
                if called in _ENV_HELPERS or (called in _ENVIRON_METHODS and on_environ):
                    name = node.args[0].value
            elif isinstance(node, ast.Subscript) and _receiver(node.value) == "environ":
                if isinstance(node.slice, ast.Constant):
                    name = node.slice.value
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                if any(getattr(target, "id", "").endswith(("ENV", "ENV_VAR")) for target in node.targets):
                    name = node.value.value
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _OURS.match(node.value):
                found.setdefault(node.value, str(path.relative_to(ROOT)))
            if isinstance(name, str) and _NAME.match(name):
                found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def settings_from_prefixes() -> dict[str, str]:
    """Variables read by prefix: ``SAM_AUTO_``, ``SAM_POLYGON_`` and ``SAM_CONCEPT_<FIELD>``, one per settings field."""
    from sam_backend.labelstudio.polygons import PolygonSettings
    from sam_backend.sam.automask import AutoMaskSettings
    from sam_backend.sam3.instances import ConceptSettings

    found = {}
    for prefix, settings in (("SAM_AUTO_", AutoMaskSettings), ("SAM_POLYGON_", PolygonSettings),
                             ("SAM_CONCEPT_", ConceptSettings)):
        for field in dataclasses.fields(settings):
            found[prefix + field.name.upper()] = settings.__name__
    return found


def test_the_scan_finds_what_it_must():
    """The scan itself: variables read in each of its ways are found (a broken scan would pass everything)."""
    found = variables_read(ROOT / "sam_backend")
    for name in ("LABEL_STUDIO_URL", "SAM_LOAD_WAIT", "THREADS", "SAM_PRECISION", "SAM_OUTPUT", "CC", "MODEL_DIR"):
        assert name in found, name
    assert not [name for name in found if name.startswith("_")]


def test_every_environment_variable_is_on_the_configuration_page():
    page = CONFIGURATION.read_text()
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", page))
    wanted = {**variables_read(ROOT / "sam_backend"), **settings_from_prefixes()}
    missing = {name: where for name, where in wanted.items() if name not in documented}
    assert not missing, f"read by the code but not in docs/configuration.md: {missing}"


def test_the_readme_fits_a_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; depth belongs in docs/"


def _anchors(page: Path) -> set[str]:
    anchors = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_link_leads_somewhere(page):
    broken = []
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to nothing: {broken}"
