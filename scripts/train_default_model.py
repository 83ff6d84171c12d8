"""Train the small SAM that ships inside the package as ``load_model("default")``.

It builds the training data, trains a small SAM on the CPU (from scratch, further from a
checkpoint with ``--continue-from``, or with a larger encoder taught a checkpoint's
embeddings with ``--init-from``) and writes ``--output``; a second part measures it on
held-out real data next to the classical baseline. The shipped model is six such runs
and its instance decoder, each with its seed and step count in
``scripts/reproduce_default_model.sh`` (about 6.5 hours on 2 CPU cores). Everything random is drawn from
``--seed`` (default 0). With ``--steps`` unset, the number of steps is chosen after 30
timed steps to fill ``--minutes`` (default 55) and printed, and the run stops when the
time is up. The recipe's defaults and why they are what they are: docs/default_model.md.
Only measuring an existing checkpoint: ``--evaluate-only``.

Data (see docs/default_model.md):

* synthetic nuclei-like images generated on the fly from the seed (ellipses with wobbly
  outlines, touching and partly overlapping, varied size, brightness, texture, blur,
  noise, uneven illumination; some inverted or coloured like stained tissue; uint8 and
  uint16),
* random crops at about native scale (zoom 0.75-1.33, flips, rotations, brightness) of
  the real data in ../shared/data,
  except the held-out images listed in :data:`HELD_OUT`, which are only read to measure
  the trained model.

This file is not part of the package; it needs scipy and tifffile (both dependencies).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from encoder_distillation import distill_encoder, with_new_encoder  # scripts/, beside this file
from scipy import ndimage as ndi

from napari_sam.core.preprocess import Normalization
from napari_sam.model import SamConfig, ViTConfig, build_sam
from napari_sam.train import SegmentationDataset, Trainer, TrainingConfig

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "src" / "napari_sam" / "_models" / "default.pth"  # where load_model("default") looks
DATA = ROOT.parent / "shared" / "data"
MAX_BYTES = 25_000_000  # issue 15: the file may grow to 25 MB

# The standard prompt encoder and mask decoder alone hold 4.07M parameters (16.3 MB in
# float32, 8.1 MB in float16). The first models (under a 20 MB limit, float32) had room
# for three 64-wide blocks in the encoder, the defaults of --width and --depth; with the
# file stored in float16 (--half) the shipped one has six 192-wide blocks (3.5M; --init-from,
# docs/default_model.md). The input is 256 pixels: the plugin
# embeds tiles of the model input at full resolution, so the input size sets the field
# of view, not the scale, and 256 pixels keep a step cheap enough for an hour on a CPU.
IMAGE_SIZE = 256


def prepare_from_scratch(model, tie: bool, pe_scale: float) -> None:
    """Starting values that let a SAM trained from scratch localise prompts early.

    With independent random query and key projections, how strongly an image token and
    a prompt token attend to each other has nothing to do with where they are; the
    decoder must first discover that its positional encodings should be compared, which
    took thousands of steps. Starting each cross-attention with the key projection equal
    to the query projection makes ``q . k`` a positive semi-definite kernel of the
    inputs, so a point attends to the image around it from the first step. A larger
    scale of the random Fourier features makes that kernel narrower than the default
    (scale 1, made for 64x64 grids), as befits a 16x16 grid. Both are plain starting
    values in the official parameter layout."""
    from napari_sam.model.transformer import Attention

    if tie:
        for name, module in model.mask_decoder.transformer.named_modules():
            if isinstance(module, Attention) and "self_attn" not in name:
                with torch.no_grad():
                    module.k_proj.weight.copy_(module.q_proj.weight)
                    module.k_proj.bias.copy_(module.q_proj.bias)
    if pe_scale != 1.0:
        with torch.no_grad():
            model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(pe_scale)


def model_config(image_size: int = IMAGE_SIZE, width: int = 64, depth: int = 3) -> SamConfig:
    encoder = ViTConfig(
        embed_dim=width,
        depth=depth,
        num_heads=width // 32,
        global_attn_indexes=tuple(range(1, depth, 2)) + ((depth - 1,) if depth % 2 else ()),
        window_size=8,
        img_size=image_size,
    )
    return SamConfig(encoder, name="default", image_size=image_size)

DSB_FLUO = DATA / "dsb2018_fluo"
_DSB_FILES = sorted(p.name for p in (DSB_FLUO / "images").glob("*.tif")) if DSB_FLUO.is_dir() else []

HELD_OUT = {
    "stardist_bundled": ["img2d.tif + mask2d.tif", "img2d_small.tif + mask2d_small.tif"],
    "dsb2018_fluo": _DSB_FILES[-5:],
    "gonuclear_3d": ["the whole 3D stack (images/ and labels/)"],
}
"""Never trained on; the quality table is measured on these."""

NORMALIZATION = Normalization()  # the predictor's default: uint8 as is, else 1-99.8 percentiles


# --------------------------------------------------------------------------------------
# synthetic images
# --------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    # Smooth fields at a coarse grid and upsampled: far cheaper than blurring full size.
    step = max(1, int(sigma))
    small = rng.standard_normal((shape[0] // step + 2, shape[1] // step + 2))
    small = ndi.gaussian_filter(small, 1.0)
    field = ndi.zoom(small, step, order=1)[: shape[0], : shape[1]]
    return field / (field.std() + 1e-6)


def synthetic_pair(rng: np.random.Generator, large: bool = False, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One nuclei-like ``size`` x ``size`` image and its instance labels (``large``: only
    big objects, few of them)."""
    # Objects at the sizes they have in real images at native resolution (the plugin
    # embeds tiles of the model input without resampling), plus images of big objects:
    # from scratch, the decoder first learns to find an object on objects several pixels
    # wide in its 64x64 mask grid.
    H = W = size
    radius = math.exp(rng.uniform(math.log(4), math.log(30)))
    if large:
        radius = rng.uniform(15, 45)
    fill = rng.uniform(0.08, 0.5)
    n_target = max(1, int(fill * H * W / (math.pi * radius**2)))
    n_target = min(n_target, 400)
    labels = np.zeros((H, W), np.int32)
    signal = np.zeros((H, W), np.float32)
    # Heavily clustered images are where touching nuclei come from: draw centres around
    # a few cluster seeds for part of the images.
    clustered = rng.random() < 0.4
    seeds = rng.uniform([0, 0], [H, W], size=(int(rng.integers(1, 6)), 2))
    next_id = 1
    for _ in range(n_target * 2):
        if next_id > n_target:
            break
        if clustered:
            cy, cx = seeds[rng.integers(len(seeds))] + rng.normal(0, 4 * radius, 2)
        else:
            cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        a = radius * rng.uniform(0.6, 1.4)
        b = a * rng.uniform(0.5, 1.0)
        theta = rng.uniform(0, math.pi)
        r = int(math.ceil(a * 1.35)) + 2
        y0, y1 = int(max(0, cy - r)), int(min(H, cy + r + 1))
        x0, x1 = int(max(0, cx - r)), int(min(W, cx + r + 1))
        if y1 - y0 < 2 or x1 - x0 < 2:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        phi = np.arctan2(v, u)
        wobble = 1.0 + sum(
            rng.normal(0, 0.06) * np.cos(k * phi + rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4, 5)
        )
        inside = rho <= wobble
        if inside.sum() < 6:
            continue
        window = labels[y0:y1, x0:x1]
        overlap = (window[inside] > 0).mean()
        # Touching and slightly overlapping is common, one nucleus hiding another is not.
        if overlap > 0.25:
            continue
        window[inside] = next_id
        brightness = rng.uniform(0.25, 1.0)
        profile = 1.0 - rng.uniform(-0.3, 0.4) * np.clip(rho / wobble, 0, 1) ** 2
        signal[y0:y1, x0:x1][inside] = (brightness * profile)[inside]
        next_id += 1

    texture = 1.0 + rng.uniform(0.0, 0.35) * _smooth_noise(rng, (H, W), rng.uniform(1.5, 4))
    image = signal * np.clip(texture, 0.2, None)
    # Some nuclei carry brighter spots (chromocentres, nucleoli).
    if rng.random() < 0.4:
        spots = (rng.random((H, W)) < 0.002) & (labels > 0)
        image += ndi.gaussian_filter(spots.astype(np.float32), 1.2) * rng.uniform(3, 10) * image.max()
    image = ndi.gaussian_filter(image, rng.uniform(0.4, 2.5))
    illumination = 1.0 + rng.uniform(0, 0.5) * _smooth_noise(rng, (H, W), max(H, W) / 4)
    background = rng.uniform(0.0, 0.25)
    image = (image + background) * np.clip(illumination, 0.3, None)
    image = image + rng.uniform(0.005, 0.12) * rng.standard_normal((H, W)).astype(np.float32)
    if rng.random() < 0.5:
        # Shot noise at a random photon count.
        photons = rng.uniform(20, 400)
        image = rng.poisson(np.clip(image, 0, None) * photons).astype(np.float32) / photons

    kind = rng.random()
    if kind < 0.12:
        image = image.max() - image  # dark objects on a bright background (brightfield)
    if kind > 0.9:
        # Stained-tissue look: purple nuclei on pink, RGB uint8.
        base = np.array([235, 200, 225], np.float32) * rng.uniform(0.85, 1.0)
        nucleus = np.array([90, 50, 140], np.float32) * rng.uniform(0.6, 1.3)
        w = np.clip(image / (np.percentile(image, 99.5) + 1e-6), 0, 1)[..., None]
        rgb = base * (1 - w) + nucleus * w + rng.normal(0, 6, (H, W, 1))
        out = np.clip(rgb, 0, 255).astype(np.uint8)
    elif rng.random() < 0.55:
        # uint8 is passed through unscaled at inference, so dim 8-bit images must occur too.
        top = rng.uniform(50, 255)
        out = np.clip(image / (np.percentile(image, 99.9) + 1e-6) * top, 0, 255).astype(np.uint8)
    else:
        gain, offset = rng.uniform(200, 20000), rng.uniform(0, 2000)
        out = np.clip(image * gain + offset, 0, 65535).astype(np.uint16)

    labels = _drop_small(labels, 12)
    return out, labels


def _drop_small(labels: np.ndarray, min_pixels: int) -> np.ndarray:
    ids, counts = np.unique(labels, return_counts=True)
    small = ids[(counts < min_pixels) & (ids != 0)]
    if small.size:
        labels = np.where(np.isin(labels, small), 0, labels)
    return labels


# --------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------


def _read(path: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path)


def _augmented_crop(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, side: int = 256,
    zoom_range: tuple[float, float] = (0.75, 1.33), photometric: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A random crop at about the image's own scale (zoomed 0.75-1.33x by default,
    log-uniform), flipped and rotated, uint8 brightness varied (uint8 is not rescaled at
    inference).

    Mostly a full ``side`` x ``side`` window, as the plugin embeds tiles of the model
    input; one crop in four is smaller, and the model input enlarges it, as it enlarges
    planes smaller than the input at inference."""
    zoom = math.exp(rng.uniform(math.log(zoom_range[0]), math.log(zoom_range[1])))
    if abs(zoom - 1) > 0.05:
        image = ndi.zoom(image, (zoom, zoom) + (1,) * (image.ndim - 2), order=1)
        labels = ndi.zoom(labels, zoom, order=0)
    H, W = labels.shape
    s = side if rng.random() < 0.75 else int(rng.integers(side // 2, side))
    h, w = min(H, s), min(W, s)
    y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    img, lab = image[y : y + h, x : x + w], labels[y : y + h, x : x + w]
    k = int(rng.integers(4))
    img, lab = np.rot90(img, k, axes=(0, 1)), np.rot90(lab, k)
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    img = np.ascontiguousarray(img)
    if img.dtype == np.uint8 and rng.random() < 0.5:
        img = np.clip(img.astype(np.float32) * rng.uniform(0.6, 1.4), 0, 255).astype(np.uint8)
    if photometric > 0 and rng.random() < photometric:
        img = photometric_variant(img, rng)
    # Objects cut by the crop border stay: a person clicks on those too.
    return img, _drop_small(np.ascontiguousarray(lab).astype(np.int32), 12)


def photometric_variant(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same uint8 plane as another microscope might record it: a gamma of 0.5-2
    (log-uniform), and each with probability 0.3, a Gaussian blur (sigma 0.5-1.5 pixels),
    Gaussian noise (sigma 2-12 grey values) and a contrast change (x0.5-1.5 about the
    mean). The labels are the same objects, so the model learns them whatever the
    rendering; issue 15 lists these among the augmentations it asks for. Stained RGB
    planes are left as they are: the model reads them through their stain, whose optical
    densities a gamma would distort."""
    if image.dtype != np.uint8 or image.ndim != 2:
        return image
    # in units of the plane's own bright end, which uint8 input keeps at inference (it
    # is not rescaled), so a dim plane stays dim rather than crushed to a few grey values
    top = max(float(np.percentile(image, 99.8)), 1.0)
    x = np.clip(image.astype(np.float32) / top, 0, None)
    x = x ** math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    if rng.random() < 0.3:
        sigma = rng.uniform(0.5, 1.5)
        x = ndi.gaussian_filter(x, (sigma, sigma) + (0,) * (x.ndim - 2))
    if rng.random() < 0.3:
        mean = float(x.mean())
        x = mean + (x - mean) * rng.uniform(0.5, 1.5)
    if rng.random() < 0.3:
        x = x + rng.normal(0.0, rng.uniform(2, 12) / 255.0 * 255.0 / top, x.shape)
    return np.clip(np.rint(x * top), 0, 255).astype(np.uint8)


def real_sources(with_cryonuseg: bool = False) -> list[tuple[str, np.ndarray, np.ndarray, int]]:
    """(name, image, labels, crops to draw) of every real training plane (the
    ``cryonuseg_he_examples`` tiles only when asked: the shipped model was trained without)."""
    out = []
    for name in _DSB_FILES[:-5]:
        out.append((f"dsb2018_fluo/{name}", _read(DSB_FLUO / "images" / name), _read(DSB_FLUO / "labels" / name), 40))
    he = DATA / "dsb2018_he_brightfield"
    for p in sorted((he / "images").glob("*.tif")):
        out.append((f"dsb2018_he_brightfield/{p.name}", _read(p), _read(he / "labels" / p.name), 15))
    cryo = DATA / "cryonuseg_he_examples"
    for p in sorted((cryo / "images").glob("*.tif")) if with_cryonuseg else []:
        out.append((f"cryonuseg_he_examples/{p.name}", _read(p), _read(cryo / "labels" / p.name), 15))
    em = DATA / "em_isbi2012_membrane"
    if em.is_dir():
        vol, lab = _read(em / "train_volume.tif"), _read(em / "train_labels_instances_2d_cc.tif")
        for z in range(0, 28, 2):  # z 28 and 29 validate
            out.append((f"em_isbi2012_membrane z={z}", vol[z], lab[z], 3))
    return out


def scale_matched_zoom(labels: np.ndarray) -> tuple[float, float]:
    """The zoom range that shows a plane's objects as inference will: enlarged as
    :func:`~napari_sam.core.scale.magnification_for` enlarges them for
    :data:`SCALE_ADVICE` (1-3x; the true median diameter stands in for the estimate),
    jittered by a quarter either way."""
    from skimage.measure import regionprops

    sizes = [r.equivalent_diameter_area for r in regionprops(labels.astype(np.int32)) if r.area >= 16]
    centre = float(np.clip(SCALE_ADVICE["object_diameter"] / np.median(sizes), 1, 3)) if sizes else 1.0
    return (0.75, 1.33) if centre == 1 else (centre / 1.25, centre * 1.25)


def low_light(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A single-channel plane as a light-sheet or deep confocal plane shows it: nuclei
    barely above a background as noisy as they are (contrast to noise about 1-3, as in the
    held-out GoNuclear stack), which :func:`synthetic_pair`'s own noise rarely reaches."""
    scaled = np.clip(image.astype(np.float32) / (np.percentile(image, 99.5) + 1e-6), 0, 1)
    photons = rng.uniform(1.5, 15)
    background = rng.uniform(0.2, 0.8)
    noisy = rng.poisson((scaled + background) * photons) / photons
    noisy = noisy + rng.normal(0, rng.uniform(0.02, 0.2), noisy.shape)
    return np.clip(noisy / np.percentile(noisy, 99.9) * rng.uniform(60, 255), 0, 255).astype(np.uint8)


def low_light_pair(rng: np.random.Generator, large: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A single-channel :func:`synthetic_pair` made dim and noisy by :func:`low_light`."""
    while True:
        image, labels = synthetic_pair(rng, large)
        if image.ndim == 2 and labels.max() > 0:
            return low_light(image, rng), labels


def build_datasets(seed: int, n_synthetic: int, n_validation: int, n_large: int = 0,
                   zoom_range: tuple[float, float] | None = (0.75, 1.33), with_cryonuseg: bool = False,
                   n_low_light: int = 0, crop_factor: int = 1, photometric: float = 0.0):
    """(training, validation) datasets. Images are made when first drawn, each from its
    own seed, so the set is fixed by ``seed`` whatever the order of use. ``zoom_range``
    None: :func:`scale_matched_zoom` for each real plane. ``n_low_light`` more synthetic
    planes are dim and noisy (:func:`low_light_pair`; a quarter with large objects).
    ``crop_factor`` draws that many times the crops of each real plane (the first ones
    are the crops of factor 1, so a larger factor only adds)."""
    loaders, names = [], []

    def synth(i: int, purpose: int, large: bool = False):
        return lambda: synthetic_pair(np.random.default_rng([seed, purpose, i]), large)

    for i in range(n_synthetic):
        loaders.append(synth(i, 1))
        names.append(f"synthetic {i}")
    for i in range(n_large):
        loaders.append(synth(i, 4, True))
        names.append(f"large synthetic {i}")
    for i in range(n_low_light):
        loaders.append(lambda i=i: low_light_pair(np.random.default_rng([seed, 9, i]), i % 4 == 3))
        names.append(f"low-light synthetic {i}")
    sources = real_sources(with_cryonuseg)
    for s, (name, image, labels, crops) in enumerate(sources):
        zooms = scale_matched_zoom(labels) if zoom_range is None else zoom_range
        for c in range(crops * crop_factor):
            loaders.append(
                lambda image=image, labels=labels, s=s, c=c, zooms=zooms: _augmented_crop(
                    image, labels, np.random.default_rng([seed, 2, s, c]), zoom_range=zooms, photometric=photometric
                )
            )
            names.append(f"{name} crop {c}")
    description = {
        "source": "scripts/train_default_model.py",
        "seed": seed,
        "synthetic_images": n_synthetic,
        "large_object_synthetic_images": n_large,
        "low_light_synthetic_images": n_low_light,
        "real_planes": [name for name, *_ in sources],
        "real_crops": int(sum(c for *_, c in sources)) * crop_factor,
        "crop_zoom": "matched to the scale advice" if zoom_range is None else list(zoom_range),
        **({"photometric_crops": photometric} if photometric else {}),
        "held_out": HELD_OUT,
    }
    train = SegmentationDataset(loaders, names, description)

    val_loaders = [synth(i, 3) for i in range(n_validation)]
    val_names = [f"synthetic validation {i}" for i in range(n_validation)]
    em = DATA / "em_isbi2012_membrane"
    if em.is_dir():
        for z in (28, 29):
            val_loaders.append(
                # A model-input-sized window, as the plugin embeds it.
                lambda z=z: (
                    _read(em / "train_volume.tif")[z, 128:384, 128:384],
                    _drop_small(
                        _read(em / "train_labels_instances_2d_cc.tif")[z, 128:384, 128:384].astype(np.int32), 12
                    ),
                )
            )
            val_names.append(f"em_isbi2012_membrane z={z}")
    validation = SegmentationDataset(val_loaders, val_names, {"source": "synthetic + 2 EM planes", "seed": seed})
    return train, validation


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------


def train(args) -> Path:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # noqa: NPY002 - library code it calls may draw from numpy's global generator
    base = None
    if args.continue_from:
        from napari_sam.core.models import load_model

        # Further training of a trained model: its weights, its metadata (scale advice,
        # instance decoder), no from-scratch starting values or large-object warm-up.
        model = load_model(args.continue_from, device="cpu", dtype="float32")
        base = dict(model.metadata)
        args.easy_steps = 0
    elif args.init_from:
        from napari_sam.core.models import load_model

        # A larger encoder for a trained model: the new encoder is taught the old one's
        # embeddings first (encoder_distillation.py), the prompt encoder and mask decoder
        # are kept, then everything trains end to end.
        teacher = load_model(args.init_from, device="cpu", dtype="float32")
        base = dict(teacher.metadata)
        model = with_new_encoder(teacher, model_config(args.image_size, args.width, args.depth))
        args.easy_steps = 0
    else:
        model = build_sam(model_config(args.image_size, args.width, args.depth))
        prepare_from_scratch(model, args.tie_qk, args.pe_scale)
    n_params = sum(p.numel() for p in model.parameters())
    n_encoder = sum(p.numel() for p in model.image_encoder.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters ({n_encoder / 1e6:.2f}M in the image encoder), "
          f"input {args.image_size}")
    train_data, val_data = build_datasets(args.seed, args.synthetic, args.validation, args.large,
                                          None if args.scale_matched else (args.zoom_min, args.zoom_max),
                                          args.cryonuseg, args.low_light_images, args.crop_factor, args.photometric)
    out = Path(args.output)
    resume = args.resume and out.is_file()
    if args.init_from and not resume:
        if args.distilled and Path(args.distilled).is_file():
            # a run taught before: its encoder (and the teacher's decoder it kept); a
            # different --width or --depth fails here on the tensors' shapes
            taught = load_model(args.distilled, device="cpu", dtype="float32")
            model.load_state_dict(taught.state_dict())
            print(f"encoder taught before: {args.distilled} ({taught.metadata.get('distilled')})")
        else:
            if args.distilled:
                Path(args.distilled).parent.mkdir(parents=True, exist_ok=True)  # before the minutes of work
            losses = distill_encoder(model, teacher, train_data, args.distill_minutes, NORMALIZATION,
                                     seed=args.seed, steps=args.distill_steps)
            if args.distilled:
                from napari_sam.model.checkpoint import write_checkpoint
                from napari_sam.model.config import config_to_dict

                # float32, as the run goes on from it in memory: a reuse starts from the same weights
                write_checkpoint(args.distilled, model.state_dict(),
                                 {"config": config_to_dict(model.config), "scale": SCALE_ADVICE,
                                  "distilled": {"teacher": str(args.init_from), "steps": len(losses), "seed": args.seed,
                                                "last_mse": round(float(np.mean(losses[-50:])), 5)}})
        del teacher
    # A start on large objects only: from scratch, the decoder has to discover that the
    # prompt says where to look, and it does so far sooner when objects are big. They stay
    # in the mix afterwards: without them the model forgot it all again within 200 steps.
    easy = train_data.subset([i for i, n in enumerate(train_data.names) if n.startswith("large synthetic")])
    print(
        f"data: {len(train_data)} training planes ({args.synthetic} synthetic, {args.large} with large objects, "
        f"{args.low_light_images} low-light), "
        f"{len(val_data)} validation planes"
    )

    steps = args.steps or 100_000  # replaced after the timed steps unless given
    config = TrainingConfig(
        mode=args.mode,
        steps=steps,
        learning_rate=args.lr,
        weight_decay=0.05,
        warmup_steps=50,
        schedule="cosine",
        min_lr_fraction=0.05,
        objects_per_image=args.objects,
        images_per_step=args.images,
        corrective_iterations=0 if args.corrective_from > 0 else args.corrective_iterations,
        focal_weight=args.focal_weight,
        focal_alpha=args.focal_alpha,
        iou_rank_weight=args.iou_rank_weight,
        central_click_probability=args.central_clicks,
        mask_prompt_probability=args.mask_prompt_probability,
        mask_loss_upscale=args.mask_loss_upscale,
        box_noise=0.1,  # SAM's jitter, as the shipped model learned (a fine-tune draws boxes within a pixel)
        grad_clip=1.0,
        validate_every=0,
        validation_objects=16,
        seed=args.seed,
        normalization=NORMALIZATION,
        native_tiles=False,  # its crops are cut at native scale already, each one model input or less
    )
    if resume:
        # The run's own last save: weights, step, settings (with the step count chosen
        # for its time budget) and the optimizer's moments beside it.
        trainer = Trainer.resume(out, train_data, validation_data=val_data, device="cpu")
        config = trainer.config
        if trainer.step >= config.steps:
            # rewriting its metadata now would lose what only the first invocation knew
            raise SystemExit(f"{out} finished its {config.steps} steps already: nothing to resume")
        args.steps = config.steps
        print(f"resuming {out} at step {trainer.step} of {config.steps}")
    else:
        trainer = Trainer(model, train_data, config, validation_data=val_data, device="cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = args.minutes * 60.0
    start = time.perf_counter()
    losses, ious = [], []
    if base is not None and trainer.step == 0:
        # what training further has to beat
        val = trainer.validate()
        print(f"  validation IoU before the first step: point {val['point']:.3f}  box {val['box']:.3f}", flush=True)
    if trainer.step < args.easy_steps:
        trainer.train_data = easy
        print(f"first {args.easy_steps} steps on large synthetic objects only")
    while trainer.step < config.steps:
        if trainer.step == args.easy_steps:
            trainer.train_data = train_data
        if args.corrective_from > 0 and trainer.step == int(args.corrective_from * config.steps):
            # Corrective clicks (with the previous logits as mask prompt) only once the
            # first prompt works: they cost a decoder pass each, and before that they
            # only teach the model to correct noise.
            config.corrective_iterations = args.corrective_iterations
            print(f"from step {trainer.step}: {args.corrective_iterations} corrective iterations per object",
                  flush=True)
        record = trainer.train_step()
        losses.append(record.loss)
        ious.append(record.train_iou)
        elapsed = time.perf_counter() - start
        if not args.steps and trainer.step == 30:
            # Validation and saving take a few percent on top of the steps.
            per_step = elapsed / 30
            if args.easy_steps > 30:
                per_step *= 1.3  # the mixed data that follow are slower than the first, large-object ones
            if args.corrective_from > 0:
                # each corrective iteration adds about 0.6 of a step
                f = 1 - args.corrective_from
                per_step *= (1 - f) + f * (1 + 0.6 * args.corrective_iterations)
            config.steps = max(60, int(budget * 0.95 / per_step))
            print(f"{per_step:.2f} s per step: training {config.steps} steps (repeat with --steps {config.steps})")
        if trainer.step % 25 == 0 or trainer.step == config.steps:
            print(
                f"step {trainer.step}/{config.steps}  loss {np.mean(losses[-25:]):.4f}  "
                f"train IoU {np.mean(ious[-25:]):.3f}  lr {record.learning_rate:.2e}  {elapsed / 60:.1f} min",
                flush=True,
            )
        if trainer.step % args.validate_every == 0 or trainer.step == config.steps:
            val = trainer.validate()
            trainer.history[-1]["validation_iou"] = val["iou"]
            print(f"  validation IoU: point {val['point']:.3f}  box {val['box']:.3f}  ({val['objects']} objects)",
                  flush=True)
            trainer.save(out, optimizer=True)
        if not args.steps and elapsed > budget * 1.08 and trainer.step < config.steps:
            # A slower machine (or a busy one) must not overrun the time given.
            print(f"time is up after {trainer.step} of {config.steps} steps: stopping early")
            break
    minutes = (time.perf_counter() - start) / 60
    trainer.save(out, optimizer=False)
    from napari_sam.train.checkpoints import optimizer_state_path

    # only a resume reads it, and the run is over (it must never land beside the shipped file)
    optimizer_state_path(out).unlink(missing_ok=True)
    # Record what the trainer does not know about: where the run came from and what to
    # keep out of any comparison.
    _add_metadata(
        out,
        {
            "held_out": HELD_OUT,
            "training_minutes": round(minutes, 1),  # of the last invocation when it resumed
            "command": "scripts/train_default_model.py " + " ".join(sys.argv[1:]),
            "torch_threads": torch.get_num_threads(),
            "first_steps_on_large_synthetic_objects": args.easy_steps,
        } | ({} if base is None else {"continued_from" if args.continue_from else "encoder_distilled_from": {
            "checkpoint": str(args.continue_from or args.init_from),
            "default_model": base.get("default_model"),
            "training": {k: base.get("training", {}).get(k) for k in ("mode", "steps", "seed", "date", "settings")},
        }}),
        half=args.half,
    )
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.2f} MB) after {trainer.step} steps, {minutes:.1f} min")
    if size >= MAX_BYTES:
        raise SystemExit(f"{out} is {size} bytes, over the {MAX_BYTES} byte limit")
    return out


SCALE_ADVICE = {"object_diameter": 30.0, "box_diameter": 36.0}
"""Read by :func:`napari_sam.core.scale.magnification_for`: planes of small objects are
enlarged (1-3x) so that their objects are about 30 pixels across in the model input;
fitted on this model's own training images (scripts/scale_study.py;
docs/default_model.md, "Scale"). ``box_diameter``, read by
:mod:`napari_sam.core.object_scale`: an object prompted with a box, or corrected after a
click, is answered where it is about 36 pixels across, fitted on the same images
(docs/default_model.md, "Each box at its own scale")."""

AUTOMATIC_ADVICE = {"mode": "boxes", "detector": "log", "grid": {"pred_iou_thresh": 0.6, "stability_thresh": 0.8}}


def _add_metadata(path: Path, extra: dict, half: bool = False) -> None:
    from napari_sam.model.checkpoint import read_checkpoint, write_checkpoint

    checkpoint = read_checkpoint(path)
    meta = dict(checkpoint.metadata)
    meta["default_model"] = extra
    # How "segment everything" should run with this model (read by napari_sam.auto's
    # recommended()): its predicted IoU never reaches SAM's grid filters, and on held-out
    # DSB images LoG detector boxes measured mSA 0.342 / AP50 0.571 against 0.153 / 0.366
    # for the relaxed grid (docs/volumes.md).
    meta.setdefault("automatic", AUTOMATIC_ADVICE)  # a model trained further keeps its own (an instance decoder's)
    meta["scale"] = SCALE_ADVICE
    if half:
        state = half_precision(checkpoint.state_dict)
        extras = {k: half_precision(v) for k, v in checkpoint.extras.items()}
    else:
        state, extras = checkpoint.state_dict, dict(checkpoint.extras)
    write_checkpoint(path, state, meta, extras or None)


def half_precision(state: dict) -> dict:
    """``state`` with its weight matrices (4096 elements or more) in float16.

    Halves the file (issue 15 allows 25 MB): every loader casts to its own precision
    (``load_model`` to float32), and the large matrices lose nothing measurable, while
    the small tensors (norms, biases, the Fourier features' matrix) stay float32."""
    return {k: v.half() if v.is_floating_point() and v.numel() >= 4096 else v for k, v in state.items()}


STAIN_ADVICE = "haematoxylin"
"""Read by :func:`napari_sam.core.stain.channel_for`: stained brightfield RGB (H&E) is
read as its haematoxylin channel, a plane much like the fluorescence this model learned
nuclei from (docs/default_model.md, "H&E read as its haematoxylin stain")."""


def write_stain_advice(path: Path) -> None:
    """Record :data:`STAIN_ADVICE` in an existing checkpoint, weights and all else kept."""
    from napari_sam.model.checkpoint import read_checkpoint, write_checkpoint

    checkpoint = read_checkpoint(path)
    write_checkpoint(path, checkpoint.state_dict, dict(checkpoint.metadata, stain=STAIN_ADVICE), checkpoint.extras)
    print(f"{path}: stain advice {STAIN_ADVICE!r}")


def write_scale_advice(path: Path) -> None:
    """Record :data:`SCALE_ADVICE` in an existing checkpoint, weights and all else kept."""
    from napari_sam.model.checkpoint import read_checkpoint, write_checkpoint

    checkpoint = read_checkpoint(path)
    write_checkpoint(path, checkpoint.state_dict, dict(checkpoint.metadata, scale=SCALE_ADVICE), checkpoint.extras)
    print(f"{path}: scale advice {SCALE_ADVICE}")


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------


def held_out_planes() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(data set, image, labels) of every held-out plane."""
    sd = DATA / "stardist_bundled"
    planes = [
        ("stardist img2d", _read(sd / "img2d.tif"), _read(sd / "mask2d.tif")),
        ("stardist img2d_small", _read(sd / "img2d_small.tif"), _read(sd / "mask2d_small.tif")),
    ]
    for name in HELD_OUT["dsb2018_fluo"]:
        planes.append(("dsb2018_fluo last 5", _read(DSB_FLUO / "images" / name), _read(DSB_FLUO / "labels" / name)))
    gn = DATA / "gonuclear_3d"
    img = _read(next((gn / "images").glob("*.tif")))
    lab = _read(next((gn / "labels").glob("*.tif")))
    for z in range(5, img.shape[0], 10):  # every tenth plane: neighbours are near copies
        planes.append(("gonuclear_3d (z planes)", img[z], lab[z]))
    return planes


def evaluate(checkpoint: str | Path = "default", corrections: int = 8, seed: int = 0) -> list[dict]:
    """Quality on the held-out data with the package's own evaluation
    (:mod:`napari_sam.evaluate`), for the model and the classical baseline:
    prompted segmentation per data set (point, box, 1-8 corrective points; planes larger
    than the model input are answered on tiles, as in the plugin) and the propagation of
    every object of the 3D stack from its middle plane."""
    from napari_sam import evaluate as evaluation
    from napari_sam.core.models import load_model
    from napari_sam.core.predictor import Predictor
    from napari_sam.evaluate import WatershedBaseline

    model = load_model(str(checkpoint), device="cpu", dtype="float32")
    groups: dict[str, list] = {}
    for name, image, labels in held_out_planes():
        groups.setdefault(name, []).append(evaluation.EvalPair(image, labels, name))
    results = []
    for group, pairs in groups.items():
        for method, label in ((Predictor(model, NORMALIZATION), "default model"),
                              (WatershedBaseline(), "watershed baseline")):
            r = evaluation.evaluate_prompted(pairs, method, n_corrections=corrections, seed=seed, min_area=16,
                                             name=label)
            results.append(r | {"data": group})
    gn = DATA / "gonuclear_3d"
    volume, labels = _read(next((gn / "images").glob("*.tif"))), _read(next((gn / "labels").glob("*.tif")))
    for propagate, label in ((evaluation.sam_propagator(model), "default model"),
                             (evaluation.watershed_propagator(), "watershed baseline")):
        r = evaluation.evaluate_propagation(propagate, volume, labels, seed=seed, min_area=16, name=label)
        results.append(r | {"data": "gonuclear_3d (3D)"})
    return results


def print_table(results: list[dict]) -> None:
    prompted = [r for r in results if r["kind"] == "prompted"]
    n = len(prompted[0]["iterative"]) - 1
    print(f"| held-out data | method | objects | point | box | +1 | +2 | +4 | +{n} corrections |")
    print("|" + "---|" * 9)
    for r in prompted:
        it = r["iterative"]
        print(f"| {r['data']} | {r['method']} | {r['objects']} | {r['point']:.3f} | {r['box']:.3f} "
              f"| {it[1]:.3f} | {it[2]:.3f} | {it[4]:.3f} | {it[n]:.3f} |")
    everything = {}
    for r in prompted:
        agg = everything.setdefault(r["method"], {"objects": 0, "point": 0.0, "box": 0.0, "iterative": np.zeros(n + 1)})
        agg["objects"] += r["objects"]
        agg["point"] += r["point"] * r["objects"]
        agg["box"] += r["box"] * r["objects"]
        agg["iterative"] += np.asarray(r["iterative"]) * r["objects"]
    for method, agg in everything.items():
        k = agg["objects"]
        it = agg["iterative"] / k
        print(f"| all held-out objects | {method} | {k} | {agg['point'] / k:.3f} | {agg['box'] / k:.3f} "
              f"| {it[1]:.3f} | {it[2]:.3f} | {it[4]:.3f} | {it[n]:.3f} |")
    print()
    print("| held-out data | method | objects | mean 3D IoU |")
    print("|---|---|---|---|")
    for r in results:
        if r["kind"] == "propagation":
            print(f"| {r['data']} | {r['method']} | {r['objects']} | {r['mean_iou']:.3f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=55.0, help="training time budget (default 55)")
    parser.add_argument("--steps", type=int, default=0, help="fixed number of steps (default: fill --minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=6e-4, help="peak AdamW learning rate")
    parser.add_argument("--tie-qk", type=int, default=1, help="start cross-attention keys equal to queries")
    parser.add_argument("--pe-scale", type=float, default=0.5, help="scale of the random Fourier features")
    parser.add_argument("--images", type=int, default=1, help="images per step")
    parser.add_argument("--objects", type=int, default=16, help="objects per image and step")
    parser.add_argument("--focal-weight", type=float, default=1.0, help="focal loss weight (dice: 1)")
    parser.add_argument("--focal-alpha", type=float, default=-1.0, help="focal loss object weight (-1: none)")
    parser.add_argument(
        "--corrective-from", type=float, default=0.7, help="fraction of the run after which corrective iterations start"
    )
    parser.add_argument(
        "--mask-prompt-probability", type=float, default=0.5,
        help="chance that a corrective iteration also gets the previous logits as mask prompt",
    )
    parser.add_argument("--iou-rank-weight", type=float, default=0.0,
                        help="weight of the IoU head's ranking loss on a lone click's three masks (default 0)")
    parser.add_argument("--central-clicks", type=float, default=0.0,
                        help="chance that a first click lands in its object's inner half, where people click")
    parser.add_argument("--corrective-iterations", type=int, default=2, help="simulated corrective clicks per step")
    parser.add_argument("--easy-steps", type=int, default=300, help="first steps on large synthetic objects only")
    parser.add_argument("--large", type=int, default=300, help="synthetic training images with large objects")
    parser.add_argument("--synthetic", type=int, default=1500, help="synthetic training images")
    parser.add_argument("--low-light-images", type=int, default=0,
                        help="more synthetic training images made dim and noisy, like deep 3D stacks (default 0)")
    parser.add_argument("--validation", type=int, default=12, help="synthetic validation images")
    parser.add_argument("--validate-every", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=int, default=64, help="image encoder width")
    parser.add_argument("--depth", type=int, default=3, help="image encoder blocks")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="model input side (default 256)")
    parser.add_argument("--output", default=str(OUTPUT))
    start_from = parser.add_mutually_exclusive_group()
    start_from.add_argument("--continue-from", help="train this checkpoint further instead of a new model")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved at --output (same arguments otherwise) instead of starting again")
    start_from.add_argument("--init-from", help="give this trained checkpoint a new image encoder (--width, --depth), "
                        "taught its embeddings first, then train end to end")
    parser.add_argument("--distill-minutes", type=float, default=12.0,
                        help="time for teaching the new encoder (with --init-from)")
    parser.add_argument("--distill-steps", type=int, help="a fixed number of teaching steps instead of minutes")
    parser.add_argument("--distilled", help="with --init-from: keep the taught model here, or start from it when "
                        "the file exists (to try settings of the end-to-end training without teaching again)")
    parser.add_argument("--half", action="store_true",
                        help="store the weight matrices in float16 (the shipped file; halves it)")
    parser.add_argument("--mode", choices=["full", "decoder"], default="full",
                        help="what is trained (decoder: prompt encoder and mask decoder; keeps an instance decoder)")
    parser.add_argument("--zoom-min", type=float, default=0.75, help="smallest zoom of the real crops")
    parser.add_argument("--zoom-max", type=float, default=1.33, help="largest zoom of the real crops")
    parser.add_argument("--scale-matched", action="store_true",
                        help="zoom each real plane's crops as inference magnifies it (instead of --zoom-min/max)")
    parser.add_argument("--cryonuseg", action="store_true", help="also train on the cryonuseg_he_examples tiles")
    parser.add_argument("--crop-factor", type=int, default=1, help="draw this many times the crops of each real plane")
    parser.add_argument("--mask-loss-upscale", type=int, choices=(1, 2, 4), default=1,
                        help="judge masks on the decoder's grid (1) or 2 or 4 times finer (TrainingConfig)")
    parser.add_argument("--photometric", type=float, default=0.0,
                        help="share of real crops rendered otherwise (gamma, blur, noise, contrast; default 0)")
    parser.add_argument("--evaluate-only", action="store_true", help="only measure --output")
    parser.add_argument("--stain-only", action="store_true",
                        help="only record the stain advice (H&E read as haematoxylin) in --output, then measure it")
    parser.add_argument("--scale-only", action="store_true",
                        help="only record the scale advice in --output (then measure it unless --no-evaluate)")
    parser.add_argument("--corrective", type=int, default=8, help="corrective clicks in the evaluation")
    parser.add_argument("--json", help="also write the quality table here")
    parser.add_argument(
        "--no-evaluate", action="store_true", help="skip the held-out evaluation (for trial runs: never tune on it)"
    )
    args = parser.parse_args(argv)
    if args.distilled and not args.init_from:
        parser.error("--distilled belongs to --init-from")
    torch.set_num_threads(args.threads)

    if args.scale_only:
        write_scale_advice(Path(args.output))
    elif args.stain_only:
        write_stain_advice(Path(args.output))
    elif not args.evaluate_only:
        train(args)
    if args.no_evaluate:
        return
    start = time.perf_counter()
    results = evaluate(args.output, args.corrective, seed=args.seed)
    print(f"\nheld-out evaluation ({(time.perf_counter() - start) / 60:.1f} min), mean IoU per object:")
    print_table(results)
    if args.json:
        for r in results:
            r.pop("per_object", None)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
