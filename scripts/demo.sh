#!/usr/bin/env bash
# The main job, offline on a fresh machine: install into .venv, then segment three nuclei
# of the bundled 2D sample (from a click, a box, and a click with a background click)
# into a label image.
# NAPARI_SAM_MODEL picks the model (a registry name such as vit_b_lm, or a checkpoint file).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/napari-sam ]; then
  "$python" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0 -e .
fi
model=${NAPARI_SAM_MODEL:-../shared/reference/sam_small_seed0.pth}
case "$model" in
  ../shared/reference/*) echo "note: $model has random weights (the pipeline runs, the masks mean nothing);" \
    "set NAPARI_SAM_MODEL=vit_b_lm (downloaded once) for real results" ;;
esac
out=${1:-nuclei_labels.tif}
.venv/bin/napari-sam segment src/napari_sam/_data/nuclei_2d.tif --model "$model" \
  --prompts docs/examples/nuclei_2d_prompts.json --out "$out" --overwrite
