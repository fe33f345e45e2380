"""The allocator re-exec (``SAM_ALLOCATOR``): library search, the decision, and a real preload in a child."""

import logging
import os
import subprocess
import sys

import pytest

from sam_backend.accel import allocator
from sam_backend.commands import cli
from sam_backend.accel.allocator import (
    JEMALLOC_CONF,
    REEXEC_ENV,
    REPORTED_ENV,
    Plan,
    allocator_in_use,
    describe_allocator,
    find_allocator_library,
    library_dirs,
    log_allocator,
    plan_allocator,
    preload_environ,
    preloaded_allocator,
    reexec_argv,
)

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def _nothing(name):
    return None


# ------------------------------------------------------------------ library search


def test_library_dirs_put_the_multiarch_directory_first():
    dirs = library_dirs("aarch64", "aarch64-linux-gnu")
    assert dirs[:2] == ["/usr/lib/aarch64-linux-gnu", "/lib/aarch64-linux-gnu"]
    for usual in ("/usr/lib", "/usr/local/lib", "/usr/lib64"):
        assert usual in dirs
    assert len(dirs) == len(set(dirs))


def test_library_dirs_fall_back_to_the_machine_triplet():
    # A Python built off Debian may not know MULTIARCH.
    assert library_dirs("x86_64", "")[0] == "/usr/lib/x86_64-linux-gnu"


def test_find_prefers_the_first_directory_and_the_minimal_tcmalloc(tmp_path):
    first, second = tmp_path / "multiarch", tmp_path / "usr-lib"
    first.mkdir()
    second.mkdir()
    (second / "libtcmalloc_minimal.so.4").write_bytes(b"")
    (first / "libtcmalloc.so.4").write_bytes(b"")
    (first / "libtcmalloc_minimal.so.4").write_bytes(b"")
    found = find_allocator_library("tcmalloc", dirs=[str(first), str(second)], fallback=_nothing)
    assert found == str(first / "libtcmalloc_minimal.so.4")
    (first / "libtcmalloc_minimal.so.4").unlink()
    assert find_allocator_library("tcmalloc", dirs=[str(first), str(second)],
                                  fallback=_nothing) == str(first / "libtcmalloc.so.4")


def test_find_jemalloc_and_nothing(tmp_path):
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    found = find_allocator_library("jemalloc", dirs=[str(tmp_path)], fallback=_nothing)
    assert found == str(tmp_path / "libjemalloc.so.2")
    assert find_allocator_library("tcmalloc", dirs=[str(tmp_path)], fallback=_nothing) is None


def test_find_falls_back_to_the_loader_cache(tmp_path):
    asked = []

    def find_library(name):
        asked.append(name)
        return "libtcmalloc_minimal.so.4" if name == "tcmalloc_minimal" else None

    assert find_allocator_library("tcmalloc", dirs=[str(tmp_path)], fallback=find_library) == "libtcmalloc_minimal.so.4"
    assert asked == ["tcmalloc_minimal"]


def test_preloaded_allocator_reads_every_ld_preload_entry():
    assert preloaded_allocator(None) is None
    assert preloaded_allocator("/opt/libfoo.so") is None
    assert preloaded_allocator(f"/opt/libfoo.so {TCMALLOC}") == TCMALLOC
    assert preloaded_allocator(f"/opt/libfoo.so:{JEMALLOC}") == JEMALLOC
    assert preloaded_allocator("libtcmalloc_minimal.so.4") == "libtcmalloc_minimal.so.4"


# ------------------------------------------------------------------ the decision


def _finder(*available):
    libraries = {"tcmalloc": TCMALLOC, "jemalloc": JEMALLOC}
    return lambda name: libraries[name] if name in available else None


def _plan(environ, *available, **kwargs):
    return plan_allocator(environ, platform=kwargs.pop("platform", "linux"), find=_finder(*available), **kwargs)


@pytest.mark.parametrize("setting, available, preload", [
    (None, ("tcmalloc", "jemalloc"), TCMALLOC),
    ("auto", ("tcmalloc", "jemalloc"), TCMALLOC),
    ("", ("tcmalloc",), TCMALLOC),
    ("auto", ("jemalloc",), JEMALLOC),
    ("tcmalloc", ("tcmalloc", "jemalloc"), TCMALLOC),
    ("TCMalloc", ("tcmalloc",), TCMALLOC),
    ("jemalloc", ("tcmalloc", "jemalloc"), JEMALLOC),
])
def test_plan_preloads(setting, available, preload):
    environ = {} if setting is None else {"SAM_ALLOCATOR": setting}
    assert _plan(environ, *available) == Plan(preload=preload)


@pytest.mark.parametrize("environ, reason, warning", [
    ({"SAM_ALLOCATOR": "system"}, "SAM_ALLOCATOR=system", False),
    ({"SAM_ALLOCATOR": "tcmalloc", REEXEC_ENV: TCMALLOC}, f"preloading {TCMALLOC} failed", True),
    ({REEXEC_ENV: TCMALLOC}, f"preloading {TCMALLOC} failed", True),
    ({"LD_PRELOAD": f"/opt/libfoo.so:{JEMALLOC}"}, f"{JEMALLOC} is already preloaded", False),
    ({"SAM_ALLOCATOR": "tcmalloc", "LD_PRELOAD": TCMALLOC}, f"{TCMALLOC} is already preloaded", False),
    ({"SAM_ALLOCATOR": "tcmaloc"}, "SAM_ALLOCATOR='tcmaloc' is none of", True),
    ({"SAM_ALLOCATOR": "/nowhere/libmimalloc.so"}, "SAM_ALLOCATOR=/nowhere/libmimalloc.so: no such file", True),
])
def test_plan_runs_as_is(environ, reason, warning):
    plan = _plan(environ, "tcmalloc", "jemalloc")
    assert plan.preload is None
    assert plan.reason.startswith(reason)
    assert plan.warning is warning


def test_plan_keeps_an_allocator_this_process_already_has():
    plan = _plan({}, "tcmalloc", mapped="/usr/lib64/libtcmalloc.so.4")
    assert plan == Plan(reason="/usr/lib64/libtcmalloc.so.4 is already preloaded")


def test_plan_appends_to_another_preload():
    assert _plan({"LD_PRELOAD": "/opt/libfoo.so"}, "tcmalloc").preload == TCMALLOC


def test_plan_without_a_library():
    plan = _plan({})
    assert plan.preload is None and not plan.warning
    assert "apt-get install libtcmalloc-minimal4" in plan.reason
    asked_for = _plan({"SAM_ALLOCATOR": "jemalloc"}, "tcmalloc")
    assert asked_for.preload is None and asked_for.warning
    assert "libjemalloc2" in asked_for.reason


def test_plan_takes_a_library_path(tmp_path):
    library = tmp_path / "libmimalloc.so.2"
    library.write_bytes(b"")
    assert _plan({"SAM_ALLOCATOR": str(library)}).preload == str(library)


def test_plan_needs_linux():
    plan = _plan({}, "tcmalloc", platform="darwin")
    assert plan.preload is None and "Linux" in plan.reason


def test_preload_environ_appends_and_marks():
    before = {"LD_PRELOAD": "/opt/libfoo.so", "PATH": "/bin"}
    env = preload_environ(before, TCMALLOC)
    assert env["LD_PRELOAD"] == f"/opt/libfoo.so:{TCMALLOC}"
    assert env[REEXEC_ENV] == TCMALLOC
    assert env["PATH"] == "/bin"
    assert "MALLOC_CONF" not in env
    assert before == {"LD_PRELOAD": "/opt/libfoo.so", "PATH": "/bin"}  # a copy
    assert preload_environ({}, TCMALLOC)["LD_PRELOAD"] == TCMALLOC


def test_preload_environ_turns_jemalloc_decay_off_unless_set():
    assert preload_environ({}, JEMALLOC)["MALLOC_CONF"] == JEMALLOC_CONF
    assert "dirty_decay_ms:-1" in JEMALLOC_CONF and "muzzy_decay_ms:-1" in JEMALLOC_CONF
    assert preload_environ({"MALLOC_CONF": "narenas:2"}, JEMALLOC)["MALLOC_CONF"] == "narenas:2"


@pytest.mark.parametrize("argv, orig_argv, expected", [
    # The console script: its shebang runs the interpreter on the script.
    (["/venv/bin/sam-backend", "serve"], ["/venv/bin/python", "/venv/bin/sam-backend", "serve"],
     ["/py", "/venv/bin/sam-backend", "serve"]),
    # python -m: sys.argv[0] is __main__.py, which cannot be run as a script.
    (["/src/sam_backend/__main__.py", "serve", "--port", "1"], ["python", "-X", "dev", "-m", "sam_backend", "serve",
                                                               "--port", "1"],
     ["/py", "-X", "dev", "-m", "sam_backend", "serve", "--port", "1"]),
    (["-c", "a"], ["python", "-c", "print(1)", "a"], ["/py", "-c", "print(1)", "a"]),
    (["/tmp/child.py", "b c"], None, ["/py", "/tmp/child.py", "b c"]),
    (["-c"], None, None),
    ([""], ["python"], None),  # the interactive interpreter
    (["-"], ["python", "-"], None),  # a script on stdin, already read
])
def test_reexec_argv(argv, orig_argv, expected):
    assert reexec_argv("/py", argv, orig_argv) == expected


def test_reexec_argv_needs_an_interpreter():
    assert reexec_argv("", ["x.py"], ["python", "x.py"]) is None


# ------------------------------------------------------------------ reporting


MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234   /usr/bin/python3.11
7f1c2a000000-7f1c2a021000 rw-p 00000000 00:00 0
7f1c2b000000-7f1c2b010000 r-xp 00000000 08:01 5678   /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10
7f1c2c000000-7f1c2c010000 r-xp 00000000 08:01 9012   /usr/lib/x86_64-linux-gnu/libc.so.6
"""


def test_allocator_in_use_reads_the_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    assert allocator_in_use(str(maps)) == "tcmalloc (/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10)"
    maps.write_text(MAPS.replace("libtcmalloc_minimal.so.4.5.10", "libjemalloc.so.2"))
    assert allocator_in_use(str(maps)) == "jemalloc (/usr/lib/x86_64-linux-gnu/libjemalloc.so.2)"
    maps.write_text("\n".join(line for line in MAPS.splitlines() if "tcmalloc" not in line))
    assert allocator_in_use(str(maps)) == "glibc malloc"


def test_describe_says_why_glibc(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("")
    assert describe_allocator(Plan(reason="SAM_ALLOCATOR=system"), str(maps)) == "glibc malloc (SAM_ALLOCATOR=system)"
    # Not started by a sam-backend command, with a library at hand: say how to use it.
    hint = describe_allocator(Plan(preload=TCMALLOC), str(maps))
    assert hint.startswith("glibc malloc (") and f"LD_PRELOAD={TCMALLOC}" in hint
    maps.write_text(MAPS)
    assert describe_allocator(Plan(reason="whatever"), str(maps)).startswith("tcmalloc (")


def test_log_allocator_levels(caplog, monkeypatch):
    monkeypatch.setattr(allocator, "describe_allocator", lambda plan=None: "glibc malloc (reason)")
    monkeypatch.setenv(REPORTED_ENV, "")  # restored afterwards, as it was
    with caplog.at_level(logging.INFO, logger="sam_backend"):
        log_allocator(Plan(reason="SAM_ALLOCATOR=system"))
        log_allocator(Plan(reason="SAM_ALLOCATOR=/x.so: no such file", warning=True))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "Memory allocator: glibc malloc (reason)"),
        (logging.WARNING, "Memory allocator: glibc malloc (reason)"),
    ]
    assert os.environ[REPORTED_ENV] == "1"


# ------------------------------------------------------------------ the command line


class _Stop(Exception):
    pass


@pytest.fixture()
def calls(monkeypatch):
    """Record ensure_allocator and stop there; serve must never start gunicorn."""
    seen = []

    def ensure():
        seen.append("ensure")
        raise _Stop

    monkeypatch.setattr(allocator, "ensure_allocator", ensure)
    monkeypatch.setattr(allocator, "log_allocator", lambda plan=None: seen.append(("log", plan)))
    monkeypatch.setattr(cli, "serve", lambda args: seen.append("serve"))
    return seen


@pytest.mark.parametrize("command", [["serve"], ["precompute", "--project", "1"], ["preannotate", "--project", "1"]])
def test_model_commands_reexec_from_the_command_line(calls, monkeypatch, command):
    monkeypatch.setattr(sys, "argv", ["sam-backend", *command])
    with pytest.raises(_Stop):
        cli.main()
    assert calls == ["ensure"]


def test_main_called_from_python_never_reexecs(calls):
    assert cli.main(["serve"]) == 0
    assert calls == [("log", None), "serve"]


def test_other_commands_do_not_reexec(calls, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["sam-backend", "cache", "stats", "--cache-dir", str(tmp_path)])
    assert cli.main() == 0
    assert calls == []


# ------------------------------------------------------------------ a real preload, in a child process


HAVE_TCMALLOC = find_allocator_library("tcmalloc") is not None
needs_tcmalloc = pytest.mark.skipif(not HAVE_TCMALLOC,
                                    reason="no libtcmalloc here: apt-get install libtcmalloc-minimal4")

CHILD = """\
import os, sys
from sam_backend.accel.allocator import ensure_allocator, allocator_in_use
ensure_allocator()
with open("/proc/self/maps") as maps:
    mapped = "libtcmalloc" in maps.read()
print(allocator_in_use(), mapped, sys.argv[1:], os.environ.get("LD_PRELOAD", ""), sep="\\n")
"""


def _child_env(**settings):
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "MALLOC_CONF", REEXEC_ENV, REPORTED_ENV, "SAM_ALLOCATOR")}
    env.update(settings)
    return env


def _run(args, env, cwd=None):
    done = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    in_use, mapped, argv, ld_preload = done.stdout.splitlines()
    return in_use, mapped == "True", argv, ld_preload


@needs_tcmalloc
def test_auto_preloads_tcmalloc_in_a_child():
    in_use, mapped, argv, ld_preload = _run(["-c", CHILD, "x", "y z"], _child_env(SAM_ALLOCATOR="auto"))
    assert mapped and in_use.startswith("tcmalloc (")
    assert argv == "['x', 'y z']"  # the same command ran again
    assert "libtcmalloc" in ld_preload


@needs_tcmalloc
def test_system_keeps_glibc_in_a_child():
    in_use, mapped, _, ld_preload = _run(["-c", CHILD], _child_env(SAM_ALLOCATOR="system"))
    assert not mapped and in_use == "glibc malloc"
    assert ld_preload == ""


@needs_tcmalloc
def test_the_marker_stops_a_second_reexec():
    in_use, mapped, _, _ = _run(["-c", CHILD], _child_env(**{REEXEC_ENV: "/x/libtcmalloc_minimal.so.4"}))
    assert not mapped and in_use == "glibc malloc"


@needs_tcmalloc
def test_python_m_and_a_script_are_started_again(tmp_path):
    (tmp_path / "allocchild.py").write_text(CHILD)
    env = _child_env()
    for args in (["-m", "allocchild", "--flag", "a b"], [str(tmp_path / "allocchild.py"), "--flag", "a b"]):
        in_use, mapped, argv, _ = _run(args, env, cwd=tmp_path)
        assert mapped and in_use.startswith("tcmalloc ("), args
        assert argv == "['--flag', 'a b']", args


@pytest.mark.skipif(find_allocator_library("jemalloc") is None, reason="no libjemalloc here")
def test_jemalloc_in_a_child():
    script = CHILD.replace('os.environ.get("LD_PRELOAD", "")', 'os.environ.get("MALLOC_CONF", "")')
    in_use, mapped, _, malloc_conf = _run(["-c", script], _child_env(SAM_ALLOCATOR="jemalloc"))
    assert in_use.startswith("jemalloc (") and not mapped
    assert malloc_conf == JEMALLOC_CONF


def test_serve_logs_the_allocator_in_the_reexecuted_process(tmp_path):
    """``python -m sam_backend serve`` up to the log line: gunicorn is stopped by a port already taken."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "sam_backend", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--preset", str(tmp_path / "none"), "--log-level", "INFO"],
            env=_child_env(), capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if "Memory allocator:" in line]
    assert len(lines) == 1, done.stderr
    assert ("tcmalloc (" if HAVE_TCMALLOC else "glibc malloc (") in lines[0]
