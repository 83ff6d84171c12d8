#!/usr/bin/env bash
# Set up and run the test suite on a fresh Debian/Ubuntu machine with Python >= 3.10.
# Creates .venv, installs the package with its test extras (CPU torch 2.13.0), installs the
# system libraries napari needs headless (Xvfb, Mesa; only as root, only when missing), and
# runs pytest under a virtual display. Extra arguments go to pytest.
# The test extra holds everything the suite needs: the napari and bioimageio extras, pytest,
# pytest-qt, ruff, mypy, hypothesis. tests/test_install.py also installs the core alone into
# a fresh venv (about two minutes, from the same package index); NAPARI_SAM_SKIP_INSTALL_TEST=1
# skips it where no index is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
python=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0 -e ".[test]"

if [ -z "${DISPLAY:-}" ] && ! command -v xvfb-run >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 \
      libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 \
      libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 >/dev/null
  else
    echo "no display and no xvfb-run: install Xvfb and Mesa (see README) or set DISPLAY" >&2
    exit 1
  fi
fi
echo "setup took $(( $(date +%s) - start )) s"

status=0
if [ -z "${DISPLAY:-}" ]; then
  xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest "$@" || status=$?
else
  .venv/bin/python -m pytest "$@" || status=$?
fi
echo "setup and tests took $(( $(date +%s) - start )) s"
exit $status
