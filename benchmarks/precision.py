"""How close napari_sam's SAM comes to the official implementation, float32 and bfloat16.

Runs in the official implementation's environment (the one ``../shared/bench/official_sam.sh``
builds), with this repository's ``src`` on the path; ``napari_sam.model`` needs only torch:

    bash ../shared/bench/official_sam.sh --models          # builds /tmp/official-sam-venv once
    PYTHONPATH=src:../shared/bench/stubs /tmp/official-sam-venv/bin/python benchmarks/precision.py

Both implementations get the same official vit_b architecture with every weight perturbed
(seeded, so that the relative-position tables are not the zeros of a fresh model) and the
same real microscopy planes (``../shared/data``), shown as 1024x1024 RGB. Printed, one JSON
object per line:

- ``embedding``: largest absolute difference and relative RMS difference of the image
  embedding against the official float32 one, for our float32 encoder, our bfloat16
  encoder and the official encoder under bfloat16 autocast;
- ``masks``: mean and lowest IoU, over clicks on a grid of points, between the best
  full-size mask from each of those embeddings (decoded in float32 by the same
  implementation) and the official float32 mask.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from napari_sam.model import sam_from_state_dict

ROOT = Path(__file__).resolve().parents[1]
PLANES = {
    "stardist_img2d": "stardist_bundled/img2d.tif",
    "isbi_em": "em_isbi2012_membrane/train_volume.tif",
}


def load_plane(path: Path) -> np.ndarray:
    """First plane as 1024x1024 uint8 RGB (robust 1-99.8 percentile scaling, repeated pixels)."""
    plane = np.asarray(Image.open(path), dtype=np.float32)
    lo, hi = np.percentile(plane, (1, 99.8))
    plane = np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    reps = 1024 // max(plane.shape)
    plane = np.repeat(np.repeat(plane, reps, 0), reps, 1)[:1024, :1024]
    canvas = np.zeros((1024, 1024), np.float32)
    canvas[: plane.shape[0], : plane.shape[1]] = plane
    return np.repeat(canvas.astype(np.uint8)[..., None], 3, axis=2)


def perturbed_official(seed: int):
    import segment_anything

    torch.manual_seed(seed)
    sam = segment_anything.sam_model_registry["vit_b"](checkpoint=None).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return sam


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--grid", type=int, default=6, help="clicks on a grid of grid x grid points")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from segment_anything import SamPredictor

    official = perturbed_official(0)
    ours = sam_from_state_dict(official.state_dict())
    ours_bf16 = copy.deepcopy(ours)
    ours_bf16.image_encoder.to(torch.bfloat16)  # a copy: casting back would not restore float32
    steps = (np.arange(a.grid) + 0.5) * 1024 / a.grid
    clicks = [np.array([[x, y]]) for y in steps for x in steps]

    for name, rel in PLANES.items():
        image = load_plane(a.data / rel)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        predictor = SamPredictor(official)
        embeddings = {}
        with torch.inference_mode():
            predictor.set_image(image)
            embeddings["official float32"] = predictor.features.clone()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                predictor.set_image(image)
            embeddings["official bfloat16 autocast"] = predictor.features.float()
            embeddings["ours float32"] = ours.embed(x)
            embeddings["ours bfloat16"] = ours_bf16.embed(x)

        ref = embeddings["official float32"]
        ref_masks = masks_official(predictor, ref, clicks)
        for label, emb in embeddings.items():
            if label == "official float32":
                continue
            diff = (emb - ref).float()
            print(json.dumps({
                "image": name, "what": "embedding", "vs": "official float32", "which": label,
                "max_abs": float(diff.abs().max()), "max_value": float(ref.abs().max()),
                "relative_rms": float(diff.square().mean().sqrt() / ref.square().mean().sqrt()),
            }), flush=True)
            got = (masks_official(predictor, emb, clicks) if label.startswith("official")
                   else masks_ours(ours, emb, clicks))
            ious = [iou(m, r) for m, r in zip(got, ref_masks)]
            print(json.dumps({
                "image": name, "what": "masks", "vs": "official float32", "which": label,
                "clicks": len(ious), "mean_iou": float(np.mean(ious)), "min_iou": float(np.min(ious)),
            }), flush=True)


def masks_official(predictor, embedding: torch.Tensor, clicks) -> list[np.ndarray]:
    predictor.features = embedding
    out = []
    for pt in clicks:
        masks, scores, _ = predictor.predict(point_coords=pt, point_labels=np.array([1]), multimask_output=True)
        out.append(masks[int(np.argmax(scores))])
    return out


@torch.inference_mode()
def masks_ours(sam, embedding: torch.Tensor, clicks) -> list[np.ndarray]:
    context = sam.image_context(embedding)
    out = []
    for pt in clicks:
        coords = torch.as_tensor(pt, dtype=torch.float32)[None]
        low, scores = sam.decode(embedding, coords, torch.ones(1, 1, dtype=torch.long), context=context)
        best = low[:, int(scores.argmax())][:, None]
        out.append((sam.postprocess_masks(best, (1024, 1024), (1024, 1024)) > sam.mask_threshold)[0, 0].numpy())
    return out


if __name__ == "__main__":
    main()
