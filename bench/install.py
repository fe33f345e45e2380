"""The install without TensorFlow against the plain pip install, in one run.

Usage: python bench/install.py [--work DIR] [--keep]

For each way (docs/installation.md), in a new virtualenv and with an empty
package cache of its own (downloads included, as on a new machine):

- ``uv``:  ``pip install torch==2.13.0 uv && uv pip install -e .`` (the README's;
  ``[tool.uv] override-dependencies`` leaves tensorflow-text, and so TensorFlow, out);
- ``pip``: ``pip install torch==2.13.0 && pip install -e .`` (keras-hub's
  declared dependencies, TensorFlow among them).

it prints the install time, the environment's size on disk, whether
``tensorflow`` imports, the import time of ``keras_hub`` (the median of three
fresh interpreters), and the time from ``sam-backend serve --preset demo`` to
``/health`` saying ``"model_state": "ready"``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAYS = {
    "uv": ["pip install torch==2.13.0 uv", "uv pip install -e ."],
    "pip": ["pip install torch==2.13.0", "pip install -e ."],
}


def run(command: str, venv: Path, env: dict, timeout: float = 3600) -> float:
    started = time.perf_counter()
    subprocess.run(command, shell=True, check=True, cwd=ROOT, timeout=timeout, stdout=subprocess.DEVNULL,
                   env={**env, "VIRTUAL_ENV": str(venv), "PATH": f"{venv}/bin:{env['PATH']}"})
    return time.perf_counter() - started


def size_mb(path: Path) -> float:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            file = os.path.join(folder, name)
            if not os.path.islink(file):
                total += os.path.getsize(file)
    return total / 2**20


def import_seconds(python: Path, module: str) -> float:
    times = []
    for _ in range(3):
        done = subprocess.run([str(python), "-c", f"import time; t = time.perf_counter(); import {module}; "
                               "print(time.perf_counter() - t)"], capture_output=True, text=True, check=True,
                              env={**os.environ, "KERAS_BACKEND": "torch"})
        times.append(float(done.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def serve_to_ready(venv: Path, work: Path) -> float:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MODEL_DIR": str(work / "model-dir"), "PATH": f"{venv}/bin:{os.environ['PATH']}"}
    started = time.perf_counter()
    server = subprocess.Popen([str(venv / "bin" / "sam-backend"), "serve", "--preset", "demo", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while time.perf_counter() - started < 600:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                    if json.load(answer).get("model_state") == "ready":
                        return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the demo did not get ready in 600 s")
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="where the virtualenvs go (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the virtualenvs")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="sam-bench-install-"))
    rows = []
    for way, commands in WAYS.items():
        venv = work / f"venv-{way}"
        shutil.rmtree(venv, ignore_errors=True)
        # The base interpreter, not this one's virtualenv.
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
        caches = work / f"cache-{way}"
        shutil.rmtree(caches, ignore_errors=True)
        env = {**os.environ, "PIP_CACHE_DIR": str(caches / "pip"), "UV_CACHE_DIR": str(caches / "uv")}
        env.pop("PYTHONPATH", None)
        print(f"{way}: {' && '.join(commands)}", flush=True)
        seconds = sum(run(command, venv, env) for command in commands)
        python = venv / "bin" / "python"
        has_tf = subprocess.run([str(python), "-c", "import tensorflow"], capture_output=True).returncode == 0
        rows.append((way, seconds, size_mb(venv), has_tf, import_seconds(python, "keras_hub"),
                     serve_to_ready(venv, work)))
        if not args.keep:
            shutil.rmtree(venv, ignore_errors=True)
        shutil.rmtree(caches, ignore_errors=True)
    print(f"\n{'install':8} {'time':>7} {'size':>9} {'tensorflow':>11} {'import keras_hub':>17} {'serve demo -> ready':>20}")
    for way, seconds, size, has_tf, imported, ready in rows:
        print(f"{way:8} {seconds:6.0f}s {size:7.0f}MB {'yes' if has_tf else 'no':>11} {imported:16.2f}s {ready:19.1f}s")


if __name__ == "__main__":
    main()
