#!/usr/bin/env bash
# Rebuild the shipped default model (src/napari_sam/_models/default.pth) from nothing,
# stage by stage, as it was made; every stage with a fixed seed and step count. About
# 8.5 hours on 2 CPU cores. docs/default_model.md says what each stage does and why.
#
#   bash scripts/reproduce_default_model.sh [OUTPUT_FOLDER]   # default runs/default_model
#
# Each stage's checkpoint stays in OUTPUT_FOLDER; the last one is copied over the
# shipped file only with REPLACE=1 in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/default_model}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"

# 1. From scratch: a 0.83M-parameter encoder, 9616 steps (about 1 hour), then the scale
#    advice (objects about 30 pixels across) written into it.
$PY scripts/train_default_model.py --steps 9616 --output "$OUT/1_from_scratch.pth" --no-evaluate
$PY scripts/train_default_model.py --scale-only --output "$OUT/1_from_scratch.pth" --no-evaluate

# 2. Prompt encoder and mask decoder further: corrective clicks on every step,
#    scale-matched crops, the CryoNuSeg tiles (about 1 hour).
$PY scripts/train_default_model.py --continue-from "$OUT/1_from_scratch.pth" --mode decoder --lr 1e-4 \
    --corrective-from 0 --corrective-iterations 4 --mask-prompt-probability 0.7 --scale-matched --cryonuseg \
    --seed 1 --steps 4657 --output "$OUT/2_decoder.pth" --no-evaluate

# 3. A 3.5M-parameter encoder taught the old one's embeddings (2541 steps of 4 planes),
#    then the whole model end to end (about 1 hour together).
$PY scripts/train_default_model.py --init-from "$OUT/2_decoder.pth" --distilled "$OUT/3_distilled.pth" \
    --width 192 --depth 6 --distill-steps 2541 --lr 1e-4 --corrective-from 0 --corrective-iterations 3 \
    --mask-prompt-probability 0.7 --scale-matched --cryonuseg --seed 2 --steps 3721 --half \
    --output "$OUT/3_larger_encoder.pth" --no-evaluate

# 4. The instance decoder for automatic segmentation, on the final encoder's embeddings
#    of crops at their own scale (about 15 minutes), stored in the same file.
$PY scripts/train_default_instance_decoder.py --model "$OUT/3_larger_encoder.pth" \
    --steps 4000 --features 16 --synthetic 600 --large 100 --validation 30 \
    --checkpoint-dir "$OUT/instance_decoder" --write

# 5. Prompt encoder and mask decoder once more on the larger encoder, which stays frozen
#    (so the instance decoder of stage 4 still reads the embeddings it learned from):
#    four corrective clicks every step (about 47 minutes).
$PY scripts/train_default_model.py --continue-from "$OUT/3_larger_encoder.pth" --mode decoder --lr 1e-4 \
    --corrective-from 0 --corrective-iterations 4 --mask-prompt-probability 0.7 --scale-matched --cryonuseg \
    --seed 3 --steps 4288 --half --output "$OUT/5_decoder.pth" --no-evaluate

# 6. The stain advice: stained brightfield RGB (H&E) is read as its haematoxylin channel
#    (weights untouched).
$PY scripts/train_default_model.py --stain-only --output "$OUT/5_decoder.pth" --no-evaluate

# 7. Prompt encoder and mask decoder once more, the encoder still frozen, with the IoU
#    head's ranking term on a lone click's three masks; H&E crops are read as their
#    haematoxylin stain, as the advice of stage 6 says (about 43 minutes).
$PY scripts/train_default_model.py --continue-from "$OUT/5_decoder.pth" --mode decoder --lr 1e-4 \
    --corrective-from 0 --corrective-iterations 4 --mask-prompt-probability 0.7 --scale-matched --cryonuseg \
    --seed 4 --steps 3977 --half --iou-rank-weight 1 --output "$OUT/7_ranked.pth" --no-evaluate

# 8. The whole model end to end once more (encoder included), with stage 7's recipe at
#    half its learning rate (about 70 minutes); a full run drops the instance decoder,
#    whose encoder changed, so it is trained again on the new embeddings (about 15 minutes).
$PY scripts/train_default_model.py --continue-from "$OUT/7_ranked.pth" --mode full --lr 5e-5 \
    --corrective-from 0 --corrective-iterations 4 --mask-prompt-probability 0.7 --scale-matched --cryonuseg \
    --seed 5 --steps 6606 --half --iou-rank-weight 1 --output "$OUT/8_end_to_end.pth" --no-evaluate
$PY scripts/train_default_instance_decoder.py --model "$OUT/8_end_to_end.pth" \
    --steps 4000 --features 16 --synthetic 600 --large 100 --validation 30 \
    --checkpoint-dir "$OUT/instance_decoder_8" --write

# 9. The instance decoder's image refiner, the model and the decoder frozen (about 25 minutes).
$PY scripts/train_default_instance_decoder.py --model "$OUT/8_end_to_end.pth" --refiner \
    --steps 12000 --refine-width 16 --refine-depth 5 --synthetic 600 --large 100 --validation 30 \
    --checkpoint-dir "$OUT/image_refiner_9" --write

# 10. The scale advice once more (weights untouched): a box answered at its object's own
#     scale, "box_diameter" 36 beside the plane's "object_diameter" 30.
$PY scripts/train_default_model.py --scale-only --output "$OUT/8_end_to_end.pth" --no-evaluate

# 11. The mask refiner that sharpens prompted masks with the image, everything else frozen
#     (about 16 minutes alone), acting on planes enlarged less than twice.
$PY scripts/train_default_mask_refiner.py --model "$OUT/8_end_to_end.pth" --sources fluo,synthetic,em \
    --synthetic 60 --low-light 0 --noise 0 --corrections 2 --steps 8000 --refine-below-magnification 2 \
    --checkpoint-dir "$OUT/mask_refiner_11" --write

# 12. The prompt encoder and mask decoder once more, the encoder frozen, on real crops of
#     which 70 % are rendered as another microscope might record them (gamma, blur,
#     contrast, noise), twice as many crops of each real plane (about 58 minutes, one thread).
$PY scripts/train_default_model.py --continue-from "$OUT/8_end_to_end.pth" --mode decoder --lr 5e-5 \
    --corrective-from 0 --corrective-iterations 4 --mask-prompt-probability 0.7 --scale-matched --cryonuseg \
    --seed 6 --steps 3626 --half --iou-rank-weight 1 --crop-factor 2 --photometric 0.7 --threads 1 \
    --output "$OUT/12_photometric.pth" --no-evaluate

# 13. The mask chooser that ranks a lone click's three masks by looking at them on the image,
#     everything else frozen, stored with the mask refiner (about 40 minutes).
$PY scripts/train_default_mask_chooser.py --model "$OUT/12_photometric.pth" --threads 1 --write

# The held-out figures of docs/default_model.md
$PY scripts/train_default_model.py --evaluate-only --output "$OUT/12_photometric.pth"
if [ "${REPLACE:-0}" = 1 ]; then
    cp "$OUT/12_photometric.pth" src/napari_sam/_models/default.pth
fi
