#!/usr/bin/env bash
# The main job, offline on a fresh machine: install into .venv, then
#  - with a display: open napari with the bundled 2D nuclei and the Segment Anything widget
#    docked and started (click a nucleus, Shift-C commits; see docs/annotating.md);
#  - without one (or with --headless): the same job from the command line, segmenting
#    three nuclei of the bundled 2D sample (a click, a box, a click with a background
#    click) into a label image, nuclei_labels.tif.
# The model is the small default one that ships inside the package (offline; see
# docs/default_model.md). NAPARI_SAM_MODEL picks another: a registry name such as vit_b_lm
# (micro-sam's light-microscopy model, downloaded once; use it for real work) or a
# checkpoint file.
# The headless job needs only the core install; the viewer job adds the napari extra
# (napari, a Qt binding, magicgui; docs/install.md), also into a .venv made headless before.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
viewer=0
if [ "${1:-}" != "--headless" ] && [ -n "${DISPLAY:-}" ]; then
  viewer=1
fi
if [ ! -x .venv/bin/napari-sam ]; then
  "$python" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0 -e .
fi
model=${NAPARI_SAM_MODEL:-default}
if [ "$viewer" = 1 ]; then
  # the package's own check: it fails, without importing Qt, when the extra is missing
  if ! .venv/bin/python -c "import napari_sam._qt" 2>/dev/null; then
    .venv/bin/pip install -q torch==2.13.0 -e ".[napari]"
  fi
  exec .venv/bin/napari-sam annotate --sample nuclei_2d --model "$model" --start
fi
out=${2:-nuclei_labels.tif}
.venv/bin/napari-sam segment src/napari_sam/_data/nuclei_2d.tif --model "$model" \
  --prompts docs/examples/nuclei_2d_prompts.json --out "$out" --overwrite
