#!/usr/bin/env bash
# End-to-end tests: sam-backend behind a real Label Studio, through its API and
# its UI (Debian's Chromium driven by Playwright). Installs what is missing, then
#
#   python -m pytest -q tests/e2e "$@"
#
# Run it from the environment where sam-backend is installed (README: Quickstart).
# Nothing is skipped: if Label Studio, Chromium or Playwright cannot be installed,
# this fails with a message saying which.
set -euo pipefail
cd "$(dirname "$0")/../.."

die() { echo "ERROR (tests/e2e/run.sh): $*" >&2; exit 1; }

# The environment must already hold sam-backend (and torch): installing the
# [e2e] extra elsewhere would pull the registry's CUDA build of torch.
python -c "import sam_backend, torch" 2>/dev/null \
    || die "run this from the environment where sam-backend is installed (README: Quickstart)"

# Label Studio, in its own cached virtualenv.
SAM_E2E_LS_VENV="$(tests/e2e/labelstudio.sh install)" || die "Label Studio could not be installed (see above)"
export SAM_E2E_LS_VENV

# Debian's Chromium; Playwright never downloads a browser here.
if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    echo "Installing Debian's chromium and chromium-driver" >&2
    if [[ $(id -u) -ne 0 ]]; then
        die "/usr/bin/chromium is missing; as root: apt-get install -y chromium chromium-driver"
    fi
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >&2 \
        || die "apt-get could not install chromium and chromium-driver"
fi
/usr/bin/chromium --version >&2 || die "/usr/bin/chromium does not run"

# Playwright for Python (the [e2e] extra) in this environment. With uv, as the
# README installs: pip would re-resolve keras-hub and pull TensorFlow back in.
if ! python -c "import playwright.sync_api" 2>/dev/null; then
    if command -v uv >/dev/null; then
        uv pip install --python "$(command -v python)" -e '.[e2e]' >&2 || die "uv could not install the [e2e] extra (playwright)"
    else
        python -m pip install --disable-pip-version-check -e '.[e2e]' >&2 || die "pip could not install the [e2e] extra (playwright)"
    fi
fi

python -m pytest -q tests/e2e "$@"
