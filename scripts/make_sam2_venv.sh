#!/usr/bin/env bash
# Make a separate venv with the ORIGINAL SAM 2.1 code (Meta's sam2 1.1.0) for
# scripts/make_sam2_reference.py. It is never the project's venv: sam2 drags in torchvision,
# hydra and iopath, none of which napari-sam needs.
#
#   scripts/make_sam2_venv.sh [DIR]        (default /work/sam2venv)
#
# torch is pinned (==2.13.0) in every pip call so that nothing resolves to another torch.
# sam2 1.1.0 is an sdist whose build imports torch: it is built without build isolation (an
# isolated build would fetch whatever torch is newest) and without its CUDA extension
# (SAM2_BUILD_CUDA=0; the reference sets are made with fill_hole_area=0, which never needs it).
# pip's own configuration (index, find-links, PIP_INDEX_URL ...) applies; for a CPU-only torch
# on plain PyPI set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
# torchvision comes along as a dependency of sam2 and may not import beside torch 2.13; the
# reference script stands in for the three transforms sam2 uses.
set -euo pipefail

DIR="${1:-/work/sam2venv}"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"
SAM2="sam2==1.1.0"

if [ -e "$DIR/bin/python" ]; then
    echo "error: $DIR already holds a venv; remove it or name another folder" >&2
    exit 2
fi

"$PYTHON" -m venv "$DIR"
"$DIR/bin/python" -m pip install --upgrade pip setuptools wheel
"$DIR/bin/python" -m pip install "$TORCH" numpy
SAM2_BUILD_CUDA=0 SAM2_BUILD_ALLOW_ERRORS=1 \
    "$DIR/bin/python" -m pip install --no-build-isolation "$TORCH" "$SAM2"

# the check the reference script relies on: the official modules import and build
"$DIR/bin/python" - <<'PY'
import importlib.metadata as md
import torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert md.version("sam2") == "1.1.0", md.version("sam2")
import hydra, omegaconf  # noqa: F401  (sam2's config system)
print("torch", torch.__version__, "sam2", md.version("sam2"), "ok")
PY
echo "made $DIR"
