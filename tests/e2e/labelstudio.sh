#!/usr/bin/env bash
# Install Label Studio from PyPI into its own virtualenv (its pins clash with
# ours) and print that virtualenv's path on stdout.
#
#   tests/e2e/labelstudio.sh install
#
# The virtualenv is cached under ${SAM_E2E_CACHE:-~/.cache/sam-backend-e2e},
# keyed by the version spec and the Python version, so local runs install once;
# from nothing (CI) it is built here. Any failure exits non-zero with the
# install log: the e2e tests must fail loudly, never skip.
set -euo pipefail

LS_SPEC="${SAM_E2E_LS_SPEC:-label-studio==1.23.*}"
CACHE="${SAM_E2E_CACHE:-$HOME/.cache/sam-backend-e2e}"
# The base interpreter, not an active virtualenv's: a venv made from a venv
# breaks when that one is deleted (CI recreates .ci-venv on every run).
PYTHON="${SAM_E2E_PYTHON:-$(python3 -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')}"

die() { echo "ERROR (tests/e2e/labelstudio.sh): $*" >&2; exit 1; }

install() {
    mkdir -p "$CACHE"
    local pyver key venv log
    pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || die "no usable python3 ($PYTHON)"
    key="$(printf '%s|%s' "$LS_SPEC" "$pyver" | sha256sum | cut -c1-12)"
    venv="$CACHE/ls-venv-$key"
    log="$CACHE/ls-install-$key.log"
    # One installer at a time (two test runs may start together).
    exec 9>"$CACHE/.install.lock"
    flock 9
    if [[ ! -f "$venv/.installed" ]]; then
        echo "Installing $LS_SPEC for Python $pyver into $venv (log: $log)" >&2
        rm -rf "$venv"
        local started=$SECONDS
        if ! { "$PYTHON" -m venv "$venv" && "$venv/bin/pip" install --disable-pip-version-check "$LS_SPEC"; } >"$log" 2>&1; then
            tail -n 40 "$log" >&2
            die "cannot install $LS_SPEC from PyPI (full log: $log)"
        fi
        # (`label-studio --version` would start a server: ask for a subcommand's help instead.)
        "$venv/bin/label-studio" start --help >>"$log" 2>&1 || { tail -n 20 "$log" >&2; die "label-studio installed but does not run"; }
        "$venv/bin/pip" show label-studio | sed -n 's/^Version: //p' >"$venv/.installed"
        echo "Installed label-studio $(cat "$venv/.installed") in $((SECONDS - started)) s" >&2
    fi
    echo "$venv"
}

case "${1:-}" in
    install) install ;;
    *) die "usage: $0 install" ;;
esac
