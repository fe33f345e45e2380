"""Run the model under tcmalloc (or jemalloc) instead of glibc's malloc.

With glibc's malloc every large attention buffer of SAM's ViT image encoder
(hundreds of MB for a global-attention block) is a fresh ``mmap`` that the
kernel page-faults and zeroes, and is unmapped again on free. tcmalloc keeps
those pages and hands them out again: it about halves the ViT-B encode on a
2-core x86 CPU. An allocator can only be swapped before the process starts,
so the commands that run the model (``serve``, ``precompute``,
``preannotate``) call :func:`ensure_allocator` right after parsing their
arguments, before torch is imported: it re-executes the same command once with
``LD_PRELOAD`` set to Debian's ``libtcmalloc_minimal.so.4``, else
``libjemalloc.so.2``, when one is installed. gunicorn workers are forked from
the re-executed master and inherit it.

``SAM_ALLOCATOR`` picks: ``auto`` (default: tcmalloc, else jemalloc, else
glibc), ``tcmalloc``, ``jemalloc``, ``system`` (glibc, no re-exec), or the path
of an allocator's shared library. An allocator already in ``LD_PRELOAD`` (the
Docker image sets one) is kept as it is.

Two private environment variables travel to the children: ``_SAM_ALLOCATOR_REEXEC``
(the library preloaded by the re-exec; set, it stops a second re-exec) and
``_SAM_ALLOCATOR_REPORTED`` (the command logged the allocator, so gunicorn's
workers need not).

Standard library only: it runs before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

SETTING_ENV = "SAM_ALLOCATOR"
#: Set (to the preloaded library) in the environment of the re-executed process.
REEXEC_ENV = "_SAM_ALLOCATOR_REEXEC"
#: Set once the allocator has been logged, for processes forked or started from this one.
REPORTED_ENV = "_SAM_ALLOCATOR_REPORTED"
SETTINGS = ("auto", "tcmalloc", "jemalloc", "system")

#: Shared library names tried per allocator, best first.
LIBRARY_NAMES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
#: ``ctypes.util.find_library`` names, for libraries outside the usual directories.
FIND_LIBRARY_NAMES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
#: jemalloc returns freed pages to the kernel after 10 s by default: the next
#: encode would page-fault them in again, which is what we are avoiding.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
#: tcmalloc prints "tcmalloc: large alloc ..." for each allocation over 1 GiB
#: (ViT-H's global attention); that is expected here, not worth a log line.
TCMALLOC_REPORT_THRESHOLD = str(1 << 40)
INSTALL_HINT = "apt-get install libtcmalloc-minimal4 for a faster encoder"

# An allocator library's file name in /proc/self/maps or LD_PRELOAD.
_ALLOCATOR_FILE = re.compile(r"lib(tcmalloc|jemalloc|mimalloc)[\w.-]*\.so")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`plan_allocator` decided.

    ``preload`` is the library to re-execute with (``None``: run as is),
    ``reason`` says why not, for the log line, and ``warning`` that the user
    asked for something that could not be done.
    """

    preload: str | None = None
    reason: str = ""
    warning: bool = False


def library_dirs(machine: str | None = None, multiarch: str | None = None) -> list[str]:
    """Directories searched for the allocator libraries, most specific first.

    >>> library_dirs("x86_64", "x86_64-linux-gnu")[:2]
    ['/usr/lib/x86_64-linux-gnu', '/lib/x86_64-linux-gnu']
    """
    import platform
    import sysconfig

    triplets = [multiarch if multiarch is not None else sysconfig.get_config_var("MULTIARCH")]
    # Pythons built off Debian may not know the multiarch triplet; Debian's is <machine>-linux-gnu.
    triplets.append(f"{machine or platform.machine()}-linux-gnu")
    dirs = []
    for triplet in filter(None, triplets):
        dirs += [f"/usr/lib/{triplet}", f"/lib/{triplet}"]
    dirs += ["/usr/lib64", "/lib64", "/usr/lib", "/lib", "/usr/local/lib64", "/usr/local/lib"]
    # A conda environment's own gperftools (conda install gperftools).
    for prefix in (os.environ.get("CONDA_PREFIX"), sys.prefix):
        if prefix:
            dirs.append(os.path.join(prefix, "lib"))
    return list(dict.fromkeys(dirs))


def find_allocator_library(name: str, dirs: Iterable[str] | None = None,
                           fallback: Callable[[str], str | None] | None = None) -> str | None:
    """The path (or loader name) of the ``tcmalloc`` or ``jemalloc`` library, or ``None``.

    Looks for Debian's file names in :func:`library_dirs`, then asks
    ``ctypes.util.find_library`` (the loader cache), whose bare soname
    ``LD_PRELOAD`` accepts as well.

    >>> find_allocator_library("tcmalloc")  # doctest: +SKIP
    '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4'
    """
    for directory in library_dirs() if dirs is None else dirs:
        for filename in LIBRARY_NAMES[name]:
            path = os.path.join(directory, filename)
            if os.path.isfile(path):
                return path
    if fallback is None:
        import ctypes.util

        fallback = ctypes.util.find_library
    for short in FIND_LIBRARY_NAMES[name]:
        found = fallback(short)
        if found:
            return found
    return None


def preloaded_allocator(ld_preload: str | None) -> str | None:
    """The allocator library already in an ``LD_PRELOAD`` value, or ``None``.

    >>> preloaded_allocator("/opt/libfoo.so:/usr/lib/libjemalloc.so.2")
    '/usr/lib/libjemalloc.so.2'
    """
    for entry in re.split(r"[:\s]+", ld_preload or ""):
        if _ALLOCATOR_FILE.search(os.path.basename(entry)):
            return entry
    return None


def _is_path(setting: str) -> bool:
    return "/" in setting or bool(re.search(r"\.so(\.\d+)*$", setting))


def plan_allocator(environ: Mapping[str, str], *, platform: str = sys.platform, mapped: str | None = None,
                   find: Callable[[str], str | None] = find_allocator_library,
                   is_file: Callable[[str], bool] = os.path.isfile) -> Plan:
    """Decide whether to re-execute, and with which library, from ``SAM_ALLOCATOR`` and the environment.

    ``mapped`` is an allocator library this process already has loaded (from
    /proc/self/maps). Pure apart from ``find`` and ``is_file``, for the tests.

    >>> plan_allocator({"SAM_ALLOCATOR": "system"})
    Plan(preload=None, reason='SAM_ALLOCATOR=system', warning=False)
    >>> plan_allocator({}, find=lambda name: "/lib/libtcmalloc_minimal.so.4" if name == "tcmalloc" else None).preload
    '/lib/libtcmalloc_minimal.so.4'
    """
    raw = environ.get(SETTING_ENV, "").strip()
    setting = raw.lower() or "auto"
    if environ.get(REEXEC_ENV):
        return Plan(reason=f"preloading {environ[REEXEC_ENV]} failed", warning=True)
    if setting == "system":
        return Plan(reason=f"{SETTING_ENV}=system")
    if setting not in SETTINGS and not _is_path(raw):
        return Plan(reason=f"{SETTING_ENV}={raw!r} is none of {', '.join(SETTINGS)} or a library path",
                    warning=True)
    if not platform.startswith("linux"):
        return Plan(reason=f"LD_PRELOAD needs Linux, not {platform}")
    already = mapped or preloaded_allocator(environ.get("LD_PRELOAD"))
    if already:
        return Plan(reason=f"{already} is already preloaded")
    if setting not in SETTINGS:
        if not is_file(raw):
            return Plan(reason=f"{SETTING_ENV}={raw}: no such file", warning=True)
        return Plan(preload=raw)
    for name in ("tcmalloc", "jemalloc") if setting == "auto" else (setting,):
        library = find(name)
        if library:
            return Plan(preload=library)
    if setting == "auto":
        return Plan(reason=f"no tcmalloc or jemalloc found: {INSTALL_HINT}")
    package = "libtcmalloc-minimal4" if setting == "tcmalloc" else "libjemalloc2"
    return Plan(reason=f"{SETTING_ENV}={setting} but no lib{setting} found: apt-get install {package}", warning=True)


def preload_environ(environ: Mapping[str, str], library: str) -> dict[str, str]:
    """The environment to re-execute with: ``library`` appended to ``LD_PRELOAD``, and the marker.

    >>> preload_environ({"LD_PRELOAD": "/opt/libx.so"}, "/lib/libtcmalloc_minimal.so.4")["LD_PRELOAD"]
    '/opt/libx.so:/lib/libtcmalloc_minimal.so.4'
    """
    env = dict(environ)
    # The user's own preloads stay, first.
    env["LD_PRELOAD"] = ":".join(filter(None, [environ.get("LD_PRELOAD", "").strip(" :"), library]))
    env[REEXEC_ENV] = library
    name = os.path.basename(library)
    if "jemalloc" in name:
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    elif "tcmalloc" in name:
        env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", TCMALLOC_REPORT_THRESHOLD)
    return env


def reexec_argv(executable: str | None, argv: Sequence[str], orig_argv: Sequence[str] | None) -> list[str] | None:
    """The command line that starts this same command again, or ``None`` when there is none.

    ``sys.orig_argv`` (Python 3.10+) keeps how the interpreter was started
    (``python -m sam_backend serve``, ``python /venv/bin/sam-backend serve``
    from a console script's shebang, ``python -c ...``, and ``-X``/``-W``
    options), which ``sys.argv`` loses: its ``argv[0]`` is ``__main__.py``
    for ``-m``. An interactive interpreter or a script read from stdin cannot
    be started again.

    >>> reexec_argv("/venv/bin/python", ["/x/__main__.py", "serve"], ["python", "-m", "sam_backend", "serve"])
    ['/venv/bin/python', '-m', 'sam_backend', 'serve']
    """
    if not executable or not argv or argv[0] in ("", "-"):
        return None
    if orig_argv:
        return [executable, *orig_argv[1:]]
    # Before 3.10: right for a script or a console script, not for -m or -c.
    return [executable, *argv] if argv[0] not in ("-c", "-m") else None


def ensure_allocator(environ: Mapping[str, str] | None = None) -> Plan:
    """Re-execute this process under tcmalloc or jemalloc if it helps; returns only when it does not.

    Call it at start, after argument parsing and before torch is imported.
    The returned plan says why this process runs as it is, for
    :func:`log_allocator`.

    >>> plan = ensure_allocator()  # may replace this process  # doctest: +SKIP
    """
    environ = os.environ if environ is None else environ
    mapped = _mapped_allocator(_read_maps())
    plan = plan_allocator(environ, mapped=mapped[1] if mapped else None)
    if plan.preload is None:
        return plan
    argv = reexec_argv(sys.executable, sys.argv, getattr(sys, "orig_argv", None))
    if argv is None:
        return Plan(reason=f"cannot start this command again to preload {plan.preload}", warning=True)
    logger.debug("Re-executing with LD_PRELOAD=%s: %s", plan.preload, argv)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()  # exec drops what Python has buffered
    try:
        os.execve(sys.executable, argv, preload_environ(environ, plan.preload))
    except OSError as exc:
        return Plan(reason=f"cannot re-execute to preload {plan.preload}: {exc}", warning=True)
    raise AssertionError("unreachable")  # pragma: no cover


def _read_maps(path: str = "/proc/self/maps") -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as maps:
            return maps.read()
    except OSError:
        return ""


def _mapped_allocator(maps: str) -> tuple[str, str] | None:
    """``(name, path)`` of the allocator library in a /proc/<pid>/maps text, or ``None``."""
    for line in maps.splitlines():
        fields = line.split(None, 5)  # address perms offset dev inode [path]
        path = fields[5].strip() if len(fields) == 6 else ""
        match = _ALLOCATOR_FILE.search(os.path.basename(path))
        if match:
            return match.group(1), path
    return None


def allocator_in_use(maps_path: str = "/proc/self/maps") -> str:
    """The malloc this process runs with: ``"tcmalloc (<library>)"``, ``"jemalloc (<library>)"``, or glibc's.

    >>> allocator_in_use()  # doctest: +SKIP
    'tcmalloc (/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)'
    """
    mapped = _mapped_allocator(_read_maps(maps_path))
    if mapped:
        return f"{mapped[0]} ({mapped[1]})"
    return "glibc malloc" if sys.platform.startswith("linux") else "the system malloc"


def describe_allocator(plan: Plan | None = None, maps_path: str = "/proc/self/maps") -> str:
    """:func:`allocator_in_use`, with the reason when it is glibc's (from ``plan``, else worked out).

    >>> describe_allocator(Plan(reason="SAM_ALLOCATOR=system"))  # doctest: +SKIP
    'glibc malloc (SAM_ALLOCATOR=system)'
    """
    in_use = allocator_in_use(maps_path)
    if "(" in in_use:
        return in_use
    if plan is None:  # not started by a sam-backend command (gunicorn sam_backend.wsgi:app)
        plan = plan_allocator(os.environ)
    if plan.preload:
        return f"{in_use} (start it with `sam-backend serve`, or LD_PRELOAD={plan.preload}, to use it)"
    return f"{in_use} ({plan.reason})" if plan.reason else in_use


def log_allocator(plan: Plan | None = None) -> str:
    """Log ``Memory allocator: ...`` at INFO (WARNING when a setting failed), for this process and those it starts.

    Returns the text logged.

    >>> log_allocator(ensure_allocator())  # doctest: +SKIP
    'tcmalloc (/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)'
    """
    text = describe_allocator(plan)
    failed = plan is not None and plan.warning and text.startswith(("glibc", "the system"))
    logger.log(logging.WARNING if failed else logging.INFO, "Memory allocator: %s", text)
    os.environ[REPORTED_ENV] = "1"
    return text


def log_allocator_once() -> None:
    """:func:`log_allocator`, unless the command that started this process already did (gunicorn workers).

    >>> log_allocator_once()  # doctest: +SKIP
    """
    if not os.environ.get(REPORTED_ENV):
        log_allocator()
