"""Reference sets for SAM 2.1 parity tests, made with the ORIGINAL code (Meta's ``sam2`` 1.1.0).

It builds a small SAM 2.1 through the official hydra config ``configs/sam2.1/sam2.1_hiera_t.yaml``
and the official builders (``build_sam2`` for images, ``build_sam2_video_predictor`` for video),
with overrides that shrink the widths but keep every code path of the released models:
Hiera with query pooling, windowed (padded) and global blocks, the background-interpolated
window position embedding, several heads in later stages, the FPN neck with top-down levels,
high-resolution skips in the mask decoder, the object-score MLP, dynamic multimask via
stability, multimask tokens for object pointers split into several memory tokens (the memory
dim is smaller than the model dim), signed projected temporal encodings of pointers,
``no_obj_embed_spatial``, the memory encoder and two RoPE memory-attention layers. Every
parameter and buffer that a checkpoint holds is then randomised (seeded) and written in the
official checkpoint format (``{"model": state_dict}``); the official predictors are run on
synthetic images and a synthetic video, and their inputs and outputs are written beside it.

It is NOT part of the package and never runs in the project's venv: run it with the venv of
the original code (``scripts/make_sam2_venv.sh``):

    /work/sam2venv/bin/python scripts/make_sam2_reference.py --seed 0 --out tests/reference/sam2

Two things of that venv are stood in for, both documented in tests/reference/sam2/README.md:

- torchvision does not import beside torch 2.13, but ``sam2.utils.transforms`` imports
  ``Normalize``, ``Resize`` and ``ToTensor`` from it. This script installs equivalents (for a
  float tensor, torchvision's ``Resize`` is ``F.interpolate(bilinear, align_corners=False,
  antialias=True)``) before sam2 is imported;
- the CUDA extension ``sam2._C`` is absent, so the video predictor is built with
  ``fill_hole_area=0`` (the hole filling needs it);
- ``SAM2VideoPredictor.init_state`` reads frames from files; ``load_video_frames`` is replaced by
  a function returning the model input computed here from uint8 frames exactly as the image
  predictor computes it (``video_input`` below).

Layout of a set ``<out>/sam2_small_seed<N>/``: ``config.json``, ``weights.pth``, ``image.npz``,
``video.npz``, ``meta.json`` (keys: see the README).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- torchvision stand-in
class _Resize(nn.Module):
    """torchvision.transforms.Resize((h, w)) on a float (C, H, W) or (B, C, H, W) tensor."""

    def __init__(self, size):
        super().__init__()
        self.size = [int(size[0]), int(size[1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)


class _Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std


class _ToTensor:
    def __call__(self, pic):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(pic).transpose(2, 0, 1))).float().div(255)


def _install_torchvision_stand_in() -> None:
    try:
        import torchvision.transforms  # noqa: F401
        return
    except Exception:  # a torchvision built for another torch raises at import
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]
    tv = types.ModuleType("torchvision")
    tr = types.ModuleType("torchvision.transforms")
    tr.Resize, tr.Normalize, tr.ToTensor = _Resize, _Normalize, _ToTensor
    tv.transforms = tr
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tr


def video_input(frames: np.ndarray, size: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, size, size) float32, as the image predictor prepares one image."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- the model
def overrides(image_size: int) -> list[str]:
    """Hydra overrides of the official tiny config that shrink it (all structure kept)."""
    f = image_size // 16
    m = "model."
    return [
        f"{m}image_size={image_size}",
        # Hiera: 4 stages (8, 16, 32, 64 channels; 1, 2, 4, 8 heads), q_pool at each stage start,
        # windows 8/4/14/7 (14 and 7 pad the 64x64 and 32x32 maps), block 4 global
        f"{m}image_encoder.trunk.embed_dim=8",
        f"{m}image_encoder.trunk.num_heads=1",
        f"{m}image_encoder.trunk.stages=[1,2,3,2]",
        f"{m}image_encoder.trunk.global_att_blocks=[4]",
        f"{m}image_encoder.trunk.window_pos_embed_bkg_spatial_size=[7,7]",
        f"{m}image_encoder.neck.d_model=32",
        f"{m}image_encoder.neck.backbone_channel_list=[64,32,16,8]",
        f"{m}image_encoder.neck.position_encoding.num_pos_feats=32",
        f"{m}memory_attention.d_model=32",
        f"{m}memory_attention.num_layers=2",
        f"{m}memory_attention.layer.d_model=32",
        f"{m}memory_attention.layer.dim_feedforward=64",
        f"{m}memory_attention.layer.self_attention.embedding_dim=32",
        f"{m}memory_attention.layer.self_attention.num_heads=2",
        f"{m}memory_attention.layer.self_attention.feat_sizes=[{f},{f}]",
        f"{m}memory_attention.layer.cross_attention.embedding_dim=32",
        f"{m}memory_attention.layer.cross_attention.num_heads=2",
        f"{m}memory_attention.layer.cross_attention.kv_in_dim=16",
        f"{m}memory_attention.layer.cross_attention.feat_sizes=[{f},{f}]",
        f"{m}memory_encoder.out_dim=16",
        f"++{m}memory_encoder.in_dim=32",
        f"{m}memory_encoder.position_encoding.num_pos_feats=16",
        f"++{m}memory_encoder.mask_downsampler.embed_dim=32",
        f"{m}memory_encoder.fuser.layer.dim=32",
    ]


# what build_sam2_video_predictor adds (sam2 1.1.0), with fill_hole_area=0: sam2._C is absent
VIDEO_EXTRA = [
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    "++model.binarize_mask_from_pts_for_mem_enc=true",
    "++model.fill_hole_area=0",
]


def resolved_node(extra: list[str]) -> dict:
    """The composed, resolved ``model:`` node of the video predictor as a plain dict."""
    from hydra import compose
    from omegaconf import OmegaConf

    cfg = compose(config_name=CONFIG, overrides=["++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor"]
                  + extra + VIDEO_EXTRA)
    OmegaConf.resolve(cfg)
    return OmegaConf.to_container(cfg.model, resolve=True)


# chosen (seed 0) so that the stability scores of the single-mask token fall on both sides of the
# official threshold 0.98 with margins, and object scores are clearly positive on tracked frames
LOGIT_GAIN = 15.0
SCORE_GAIN = 10.0
SCORE_BIAS = 2.0


def randomise(model: nn.Module, seed: int) -> dict:
    """Seeded values for every float entry of the state dict, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for k in sorted(sd):
        v = sd[k]
        if not v.is_floating_point():
            continue
        r = torch.randn(v.shape, generator=g)
        leaf = k.rsplit(".", 1)[-1]
        owner = type(_module_of(model, k)).__name__
        if v.dim() == 1 or leaf == "bias":
            if "Norm" in owner and leaf == "weight":
                new = 1.0 + 0.1 * r
            elif leaf == "gamma":  # CXBlock layer scale: make the residual branch count
                new = 0.5 * r
            else:
                new = 0.1 * r
        elif leaf in ("pos_embed", "pos_embed_window", "positional_encoding_gaussian_matrix") or k.endswith(
                ("_embed.weight", "tokens.weight", "token.weight", "embeddings.weight")) or "." not in k:
            # embeddings, tokens and top-level parameters (no_mem_embed, maskmem_tpos_enc, no_obj_ptr, ...)
            new = (1.0 if "gaussian" in leaf else 0.5) * r
        else:
            fan_in = v.numel() // v.shape[0]
            if "ConvTranspose" in owner:
                fan_in = v.shape[0] * v[0, 0].numel()
            new = r / math.sqrt(fan_in)
        v.copy_(new)
    # Sharper mask logits so that the decoder's single-mask output is stable for some prompts and
    # not for others (both branches of dynamic multimask via stability), and object scores of
    # both signs (the video predictor blanks masks whose score is negative).
    for k, v in sd.items():
        if k.startswith("sam_mask_decoder.output_hypernetworks_mlps.") and k.endswith("layers.2.weight"):
            v.mul_(LOGIT_GAIN)
        elif k.startswith("sam_mask_decoder.pred_obj_score_head.layers.2."):
            v.mul_(SCORE_GAIN)
            if k.endswith("bias"):
                v.add_(SCORE_BIAS)
    model.load_state_dict(sd)
    return {k: v.clone() for k, v in sd.items()}


def _module_of(model: nn.Module, key: str) -> nn.Module:
    mod = model
    for part in key.split(".")[:-1]:
        mod = getattr(mod, part)
    return mod


# --------------------------------------------------------------------------- synthetic data
def blob_image(rng: np.random.Generator, h: int, w: int, n: int = 7) -> np.ndarray:
    """Smooth RGB image (h, w, 3) uint8: a colour gradient and soft elliptic blobs, quantised to steps of 4."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    c0, c1 = rng.uniform(40, 120, 3), rng.uniform(40, 120, 3)
    t = (xx / w + yy / h)[..., None] / 2
    img[:] = c0 * (1 - t) + c1 * t
    for _ in range(n):
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        ry, rx = rng.uniform(0.05, 0.2) * h, rng.uniform(0.05, 0.2) * w
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        a = 1 / (1 + np.exp(np.minimum((d - 1) * 6, 50)))
        img = img * (1 - a[..., None]) + rng.uniform(0, 255, 3) * a[..., None]
    return (np.round(img / 4) * 4).clip(0, 255).astype(np.uint8)


def video_frames(rng: np.random.Generator, t: int, h: int, w: int):
    """(t, h, w, 3) uint8 with three moving blobs; returns frames and per-frame blob centres (t, 3, 2) (x, y)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    start = np.array([[0.3 * w, 0.35 * h], [0.7 * w, 0.3 * h], [0.5 * w, 0.72 * h]])
    vel = rng.uniform(-1, 1, (3, 2)) * np.array([w, h]) * 0.02
    radii = np.array([[0.12 * w, 0.16 * h], [0.1 * w, 0.12 * h], [0.14 * w, 0.12 * h]])
    colours = np.array([[220, 60, 40], [40, 200, 70], [60, 80, 230]], np.float32)
    frames, centres = [], []
    for i in range(t):
        img = np.empty((h, w, 3), np.float32)
        img[:] = 90 + 30 * np.sin(xx / 17 + i * 0.2)[..., None] * np.array([1, 0.6, 0.3])
        cs = start + vel * i
        for c, r, col in zip(cs, radii, colours):
            d = ((xx - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2
            a = 1 / (1 + np.exp(np.minimum((d - 1) * 5, 50)))
            img = img * (1 - a[..., None]) + col * a[..., None]
        frames.append(np.round(img).clip(0, 255).astype(np.uint8))
        centres.append(cs)
    return np.stack(frames), np.stack(centres), radii


IMAGE_CASES = [
    # name, points (x, y) as fractions of (W, H), labels, box as fractions, mask prompt from one_point/multi1
    ("one_point", [[0.3, 0.4]], [1], None, False),
    ("fg_bg_points", [[0.3, 0.4], [0.7, 0.6], [0.15, 0.1]], [1, 0, 1], None, False),
    ("box", None, None, [0.1, 0.15, 0.55, 0.7], False),
    ("box_and_points", [[0.35, 0.45], [0.12, 0.2]], [1, 0], [0.1, 0.15, 0.55, 0.7], False),
    ("points_with_mask", [[0.3, 0.4], [0.5, 0.5]], [1, 0], None, True),
]
BATCH_BOXES = [[0.1, 0.15, 0.55, 0.7], [0.5, 0.05, 0.95, 0.5], [0.2, 0.5, 0.8, 0.95]]
# Size budget: float32 maps do not compress, so most are kept at every 4th pixel (``*_s4``); these
# (image, case, multi) also keep the full (C, 256, 256) low-res logits, and these the full-size
# logits at every 4th pixel; FULL_FEATURES also keep the high-resolution features.
FULL_LOW_RES = {("square", "one_point", 1)}
FULL_LOGITS = {("wide", "box", 0), ("square", "fg_bg_points", 0)}
# full-size boolean masks are kept for every single-mask result and these multimask ones
MULTI_MASKS = {("square", "one_point"), ("wide", "one_point")}


def _store_decoded(out: dict, key: str, name: str, case: str, multi: int, logits, iou, low, scores) -> None:
    out[f"{key}/iou_predictions"] = iou
    out[f"{key}/object_score_logits"] = scores
    if not multi or (name, case) in MULTI_MASKS:
        out[f"{key}/masks"] = logits > 0.0  # the official mask threshold, at the original size
    out[f"{key}/low_res_logits_s4"] = np.ascontiguousarray(low[..., ::4, ::4])
    if (name, case, multi) in FULL_LOW_RES:
        out[f"{key}/low_res_logits"] = low
    if (name, case, multi) in FULL_LOGITS:
        out[f"{key}/logits_s4"] = np.ascontiguousarray(logits[..., ::4, ::4]).astype(np.float32)


def run_image(predictor, image: np.ndarray, name: str, out: dict, obj_scores: list) -> None:
    h, w = image.shape[:2]
    predictor.set_image(image)
    out[f"{name}/image"] = image
    out[f"{name}/original_size"] = np.array([h, w])
    feats = predictor._features
    out[f"{name}/image_embed"] = feats["image_embed"].numpy()
    for i, f in enumerate(feats["high_res_feats"]):
        out[f"{name}/high_res_feats_{i}_s4"] = np.ascontiguousarray(f.numpy()[..., ::4, ::4])
    scale = np.array([w, h], np.float32)
    prev = None
    for case, pts, lbl, box, use_mask in IMAGE_CASES:
        for multi in (1, 0):
            kw = {"multimask_output": bool(multi), "return_logits": True}
            if pts is not None:
                kw["point_coords"] = np.array(pts, np.float32) * scale
                kw["point_labels"] = np.array(lbl, np.int64)
            if box is not None:
                kw["box"] = np.array(box, np.float32) * np.tile(scale, 2)
            if use_mask:
                kw["mask_input"] = prev
            obj_scores.clear()
            logits, iou, low = predictor.predict(**kw)
            key = f"{name}/{case}/multi{multi}"
            for a in ("point_coords", "point_labels", "box"):
                if a in kw:
                    out[f"{key}/in_{a}"] = np.asarray(kw[a])
            if use_mask:  # the same for multi0 and multi1: kept once
                out[f"{name}/{case}/in_mask_input"] = np.asarray(kw["mask_input"])
            _store_decoded(out, key, name, case, multi, logits, iou, low, obj_scores[0])
            if case == "one_point" and multi:
                prev = low[np.argmax(iou)][None]
    # several boxes at once (batched prompts)
    boxes = np.array(BATCH_BOXES, np.float32) * np.tile(scale, 2)
    for multi in (0, 1):
        obj_scores.clear()
        logits, iou, low = predictor.predict(box=boxes, multimask_output=bool(multi), return_logits=True)
        key = f"{name}/boxes_batch/multi{multi}"
        out[f"{key}/in_box"] = boxes
        _store_decoded(out, key, name, "boxes_batch", multi, logits, iou, low, obj_scores[0])


def _score_snapshot(state, num_frames: int) -> np.ndarray:
    """(O, T) object-score logits currently stored per object and frame (NaN where none)."""
    o = len(state["obj_ids"])
    s = np.full((o, num_frames), np.nan, np.float32)
    for idx in range(o):
        d = state["output_dict_per_obj"][idx]
        for kind in ("non_cond_frame_outputs", "cond_frame_outputs"):
            for f, v in d[kind].items():
                s[idx, f] = float(v["object_score_logits"].reshape(-1)[0])
    return s


def run_video(build_video, sd: dict, image_size: int, rng: np.random.Generator, out: dict,
              t: int = 8, h: int = 72, w: int = 96) -> None:
    import sam2.sam2_video_predictor as svp

    frames, centres, radii = video_frames(rng, t, h, w)
    x = video_input(frames, image_size)
    svp.load_video_frames = lambda **kw: (x.clone(), h, w)
    predictor = build_video()
    predictor.load_state_dict(sd)
    state = predictor.init_state(video_path="<frames in memory>")
    out["frames"] = frames
    cond = 3
    c = centres[cond]
    # obj 1: a foreground point on its blob and a background point on the backdrop
    p1 = np.array([c[0], [c[0][0] + 2.2 * radii[0][0], c[0][1]]], np.float32)
    l1 = np.array([1, 0], np.int32)
    # obj 2: a box around its blob
    b2 = np.array([c[1][0] - radii[1][0], c[1][1] - radii[1][1], c[1][0] + radii[1][0], c[1][1] + radii[1][1]],
                  np.float32)
    # obj 3: its blob's ellipse as a mask
    yy, xx = np.mgrid[0:h, 0:w]
    m3 = ((xx - c[2][0]) / radii[2][0]) ** 2 + ((yy - c[2][1]) / radii[2][1]) ** 2 <= 1.0
    # obj 4: an empty mask, so that the no-object paths (object score -10 on the conditioning frame,
    # no_obj_ptr, no_obj_embed_spatial in its memories) are certainly taken
    calls = [("add1", "points", dict(points=p1, labels=l1), 1),
             ("add2", "box", dict(box=b2), 2),
             ("add3", "mask", dict(mask=m3), 3),
             ("add4", "mask", dict(mask=np.zeros((h, w), bool)), 4)]
    for key, kind, kw, oid in calls:
        if kind == "mask":
            f, ids, logits = predictor.add_new_mask(state, frame_idx=cond, obj_id=oid, **kw)
        else:
            f, ids, logits = predictor.add_new_points_or_box(state, frame_idx=cond, obj_id=oid, **kw)
        for a, v in kw.items():
            out[f"{key}/in_{a}"] = np.asarray(v)
        out[f"{key}/frame"] = np.array(f)
        out[f"{key}/obj_ids"] = np.array(ids)
        out[f"{key}/logits"] = logits[:, 0].numpy()

    def propagate(key, **kw):
        fs, ids_all, logits_all = [], [], []
        for f, ids, logits in predictor.propagate_in_video(state, **kw):
            fs.append(f)
            ids_all.append(list(ids))
            logits_all.append(logits[:, 0].numpy())
        out[f"{key}/frames"] = np.array(fs)
        out[f"{key}/obj_ids"] = np.array(ids_all)
        out[f"{key}/logits"] = np.stack(logits_all)
        out[f"{key}/object_score_logits"] = _score_snapshot(state, t)

    propagate("forward", start_frame_idx=cond)
    propagate("reverse", start_frame_idx=cond, reverse=True)
    fix = 6
    p = np.array([centres[fix][0]], np.float32)
    f, ids, logits = predictor.add_new_points_or_box(state, frame_idx=fix, obj_id=1, points=p,
                                                     labels=np.array([1], np.int32))
    out["correct/in_points"] = p
    out["correct/in_labels"] = np.array([1], np.int32)
    out["correct/frame"] = np.array(f)
    out["correct/obj_ids"] = np.array(ids)
    out["correct/logits"] = logits[:, 0].numpy()
    propagate("forward2")
    out["model_input_checksum"] = np.array([float(x.double().sum()), float(x.double().abs().sum())])


def watch_decoder(model, log: list) -> None:
    """Record, per mask-decoder call, what decides discrete choices, so that near-ties can be reported.

    The official ``predict_masks`` runs unchanged; beside it this keeps the stability score of the
    single-mask token (compared with 0.98 by dynamic multimask), the gap between the two best IoU
    predictions of the multimask tokens (argmax picks), and the object-score logits (sign decides).
    """
    dec = model.sam_mask_decoder
    official, official_forward = dec.predict_masks, dec.forward
    delta = dec.dynamic_multimask_stability_delta

    def predict_masks(*args, **kwargs):
        masks, iou, tokens, scores = official(*args, **kwargs)
        m = masks[:, 0].flatten(1)
        stab = (m > delta).sum(-1).float() / (m > -delta).sum(-1).float().clamp(min=1)
        top = iou[:, 1:].sort(dim=-1, descending=True).values
        log[-1].update({"stability": stab.tolist(), "iou_gap": (top[:, 0] - top[:, 1]).tolist(),
                        "score": scores[:, 0].tolist()})
        return masks, iou, tokens, scores

    def forward(*args, **kwargs):
        multi = kwargs["multimask_output"] if "multimask_output" in kwargs else args[4]
        log.append({"multimask": bool(multi)})
        return official_forward(*args, **kwargs)

    dec.predict_masks = predict_masks
    dec.forward = forward


def margins(log: list, thresh: float) -> dict:
    # the stability score decides only where one mask was asked for
    stab = [x for c in log if not c["multimask"] for x in c["stability"]]
    return {"calls": len(log),
            "stability_min_distance_to_threshold": min((abs(x - thresh) for x in stab), default=float("inf")),
            "stability_above_threshold": sum(x >= thresh for x in stab),
            "stability_below": sum(x < thresh for x in stab),
            "iou_top2_min_gap": min(x for c in log for x in c["iou_gap"]),
            "object_score_min_abs": min(abs(x) for c in log for x in c["score"])}


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="parent folder; the set goes to <out>/sam2_small_seed<N>")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--no-video", action="store_true")
    ap.add_argument("--shapes", help="write every key/shape of the official SAM 2.1 models to this JSON file")
    a = ap.parse_args()
    if a.image_size % 64:
        raise SystemExit("--image-size must be a multiple of 64")

    _install_torchvision_stand_in()
    import sam2
    from sam2.build_sam import build_sam2, build_sam2_video_predictor
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    if a.shapes:
        write_shapes(Path(a.shapes))
        return

    torch.manual_seed(a.seed)
    extra = overrides(a.image_size)
    stem = f"sam2_small_seed{a.seed}" + ("" if a.image_size == 1024 else f"_s{a.image_size}")
    dst = Path(a.out) / stem
    dst.mkdir(parents=True, exist_ok=True)

    model = build_sam2(CONFIG, ckpt_path=None, device="cpu", hydra_overrides_extra=list(extra))
    sd = randomise(model, a.seed)
    torch.save({"model": sd}, dst / "weights.pth")
    node = resolved_node(extra)
    (dst / "config.json").write_text(json.dumps(node, indent=1) + "\n")

    rng = np.random.default_rng(a.seed)
    out: dict = {}
    obj_scores: list = []
    model.sam_mask_decoder.register_forward_hook(lambda m, i, o: obj_scores.append(o[3].detach().numpy()[:, 0]))
    log_image: list = []
    watch_decoder(model, log_image)
    predictor = SAM2ImagePredictor(model)
    s = a.image_size
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    with torch.inference_mode():
        run_image(predictor, blob_image(rng, 1024, 1024), "square", out, obj_scores)
        run_image(predictor, blob_image(rng, 600, 1200), "wide", out, obj_scores)
    np.savez_compressed(dst / "image.npz", **out)
    diagnostics = {"image": margins(log_image, 0.98)}

    if not a.no_video:
        vout: dict = {}

        def build_video():
            # apply_postprocessing=False: VIDEO_EXTRA holds the same overrides with fill_hole_area=0
            return build_sam2_video_predictor(CONFIG, ckpt_path=None, device="cpu", apply_postprocessing=False,
                                              hydra_overrides_extra=list(extra) + VIDEO_EXTRA)

        def watched():
            video = build_video()
            watch_decoder(video, log_video)
            return video

        log_video: list = []
        run_video(watched, sd, s, rng, vout)
        diagnostics["video"] = margins(log_video, 0.98)
        np.savez_compressed(dst / "video.npz", **vout)

    meta = {"seed": a.seed, "image_size": s, "config": CONFIG, "overrides": extra, "video_overrides": VIDEO_EXTRA,
            "sam2": getattr(sam2, "__version__", None) or _version("sam2"), "torch": torch.__version__,
            "numpy": np.__version__, "command": " ".join(sys.argv),
            "gains": {"LOGIT_GAIN": LOGIT_GAIN, "SCORE_GAIN": SCORE_GAIN, "SCORE_BIAS": SCORE_BIAS},
            "near_tie_diagnostics": diagnostics}
    for part, d in diagnostics.items():
        if d["stability_min_distance_to_threshold"] < 5e-4 or d["iou_top2_min_gap"] < 1e-3 \
                or d["object_score_min_abs"] < 0.05:
            print(f"WARNING: {part}: a discrete choice is close to a tie, parity may be fragile: {d}", file=sys.stderr)
    (dst / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(dst)


def _version(dist: str) -> str:
    from importlib.metadata import version
    return version(dist)


def write_shapes(path: Path) -> None:
    """Every state-dict key and shape of the official SAM 2.1 models, built from their own yaml files.

    The official loader (``build_sam._load_checkpoint``) refuses a checkpoint with a missing or
    unexpected key, so these are exactly the keys of the released ``{"model": ...}`` files.
    Also written: the resolved ``model:`` node of each (as ``build_sam2`` composes it) and the
    checkpoint file names and URLs the package names (its README).
    """
    from hydra import compose
    from omegaconf import OmegaConf
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES, build_sam2

    man: dict = {"_checkpoints": {}, "_configs": {}}
    for model_id, (cfg, ckpt) in HF_MODEL_ID_TO_FILENAMES.items():
        if "sam2.1" not in model_id:
            continue
        name = Path(ckpt).stem  # e.g. sam2.1_hiera_tiny
        m = build_sam2(cfg, ckpt_path=None, device="cpu")
        man[name] = {k: list(v.shape) for k, v in m.state_dict().items()}
        del m
        node = compose(config_name=cfg, overrides=VIDEO_EXTRA[:3])  # what build_sam2 adds
        OmegaConf.resolve(node)
        man["_configs"][name] = OmegaConf.to_container(node.model, resolve=True)
        man["_checkpoints"][name] = {"hf_model_id": model_id, "config": cfg, "file": ckpt,
                                     "url": f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/{ckpt}",
                                     "format": "torch.save({'model': state_dict}), float32"}
    path.write_text(json.dumps(man, indent=0) + "\n")


if __name__ == "__main__":
    main()
