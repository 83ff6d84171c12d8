"""The ``napari-sam`` command line's arguments: one sub-command per job."""

from __future__ import annotations

import argparse

__all__ = ["build_parser"]


DEFAULT_CACHE = "<default>"
"""``segment --cache`` without a folder: the cache's default place."""


def _add_model_args(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    p.add_argument("--model", help="registry name (see `napari-sam models`) or checkpoint file (default: "
                   "$NAPARI_SAM_MODEL, else the small model shipped with the package)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    if not dtype:  # training runs in float32
        return
    p.add_argument(
        "--dtype",
        default="auto",
        help="encoder precision: float32 (exact), bfloat16, float16 (GPU) or auto (default: "
        "bfloat16 where the hardware computes it natively, else float32)",
    )


def _magnification(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'auto', not {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _positive(text: str) -> float:
    value = _number(text)
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_int(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not a positive number")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _fraction(text: str) -> float:
    value = _non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return value


def _channel(text: str):
    from ..core.stain import STAIN_CHANNELS

    if text in STAIN_CHANNELS:
        return text
    names = ", ".join(STAIN_CHANNELS)
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a channel number or one of {names}, not {text!r}") from None
    if value < 0:  # channels count from 0; a negative one would pick from the end unasked
        raise argparse.ArgumentTypeError(f"a channel number (0 or more) or one of {names}, not {text}")
    return value


_STAIN_HELP = ("; for RGB: 'rgb' (the colours) or 'haematoxylin' (that stain separated from stained brightfield; "
               "the default for such images when the model asks for it, as the default model does)")


def _add_scale_args(p: argparse.ArgumentParser) -> None:
    """--magnification and --diameter: how much the model sees the planes enlarged."""
    p.add_argument("--magnification", type=_magnification, default=None, metavar="M|auto",
                   help="how many times the model sees the image enlarged: tiles of (model input / M) pixels are "
                   "embedded. 'auto' chooses it from the objects' diameter (estimated from the image, or "
                   "--diameter) for models that record the diameter they want, as the default model does "
                   "(default: the model's advice; 1 for SAM's and micro-sam's weights)")
    p.add_argument("--diameter", type=float, default=None, metavar="PIXELS",
                   help="typical object diameter in image pixels, when known (instead of the estimate)")


def _add_output_args(p: argparse.ArgumentParser, never: str) -> None:
    """--out and/or --labels-into: where the labels go (one of them is required)."""
    p.add_argument("--out", help=f"label image to write: .tif, .zarr or .npy, in an existing folder; never {never} "
                   "(give --out, --labels-into, or both)")
    p.add_argument("--labels-into", metavar="IMAGE.ome.zarr",
                   help="write the labels into this OME-Zarr image (NGFF 0.4 or 0.5) as the label image "
                   "labels/NAME, with one resolution level per image level (same shapes without C, same scales), "
                   "so OME-Zarr viewers show them over the image; the segmented image itself or another OME-Zarr of "
                   "the same shape. Only labels/NAME is added: the image's arrays and metadata stay as they are")
    p.add_argument("--label-name", metavar="NAME",
                   help="name of the label image under labels/ for --labels-into (default: napari-sam)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists (a .tif/.npy file, or a .zarr label array napari-sam wrote; "
                   "never another folder or Zarr group), and an existing label image labels/NAME of --labels-into")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="napari-sam", description="Segment Anything for microscopy.")
    parser.add_argument("--version", action="version", version=f"napari-sam {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the models that can be loaded by name")

    dl = sub.add_parser("download", help="download a model into the cache (checksum verified)")
    dl.add_argument("name", help="a model's registry name (see `napari-sam models`)")

    seg = sub.add_parser(
        "segment",
        help="segment objects from point or box prompts (--mode prompts), or everything (--mode ais|apg|auto|boxes)",
        description="--mode prompts (default): each --box is one object (points, if given with a single box, "
        "refine it); without boxes all points describe one object. --prompts reads many objects from JSON. "
        "Objects get ids 1, 2, ... in order and never overwrite each other. Every object of every plane: "
        "--mode ais (micro-sam's automatic instance segmentation from the model's instance decoder: models such "
        "as vit_b_lm have one), --mode apg (objects of the decoder's maps as point prompts for SAM), --mode auto "
        "(a grid of point prompts filtered by predicted IoU and stability, duplicates removed) or --mode boxes "
        "(boxes from a classical detector, Otsu or LoG, each through SAM), with the settings the model "
        "recommends; the planes of a volume are linked into 3D objects (the Z stack of each time point of a "
        "TZYX image). The labels go to --out (a file) and/or, with --labels-into, into an "
        "OME-Zarr image as the NGFF label image labels/NAME (in --mode prompts a volume gets the objects on its "
        "--plane).",
    )
    seg.add_argument("--mode", choices=["prompts", "ais", "apg", "auto", "boxes"], default="prompts")
    seg.add_argument("--points-per-side", type=_positive_int, default=None,
                     help="auto mode: grid density per tile (default: the model's advice, else 32)")
    seg.add_argument("--detector", choices=["otsu", "log"], default=None,
                     help="boxes mode: the detector (default: the one measured to suit the model; otsu for SAM's own)")
    seg.add_argument("--min-area", type=_count, default=None,
                     help="automatic modes: smaller objects are dropped (default: the model's advice, else 25)")
    seg.add_argument("--augment", action="store_true",
                     help="ais mode: average the instance decoder's maps of the plane seen enlarged (1, 1.5, 2x) "
                     "and mirrored (12 views) before post-processing: better on small touching objects, about 30 "
                     "times the embedding work")
    _add_scale_args(seg)
    seg.add_argument("--axes", help="axis letters from TZCYX, e.g. CZYX (default: what an OME-Zarr, OME-TIFF or "
                     "ImageJ file declares, else a guess from the shape); --plane indexes its T and Z axes")
    seg.add_argument("image", help="TIFF, Zarr, .npy, PNG or JPEG (a bool mask image is read as 0/255)")
    _add_model_args(seg)
    seg.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"), default=[],
                     help="foreground point (x = column, y = row); repeatable")
    seg.add_argument("--bg-point", nargs=2, type=float, action="append", metavar=("X", "Y"), default=[],
                     help="background point; repeatable")
    seg.add_argument("--box", nargs=4, type=float, action="append", metavar=("X0", "Y0", "X1", "Y1"), default=[],
                     help="box around one object; repeatable")
    seg.add_argument("--prompts", help="JSON file: a list of {points, labels, box} objects (points as [x, y], "
                     "box as [x0, y0, x1, y1], in plane pixels)")
    seg.add_argument("--plane", type=int, nargs="+", default=[], metavar="I",
                     help="index of the 2D plane in a 3D/4D image (leading axes)")
    seg.add_argument("--channel", type=_channel, help="channel to use in a multichannel image (channels last)"
                     + _STAIN_HELP)
    seg.add_argument("--cache", nargs="?", const=DEFAULT_CACHE, metavar="FOLDER",
                     help="read and keep the embeddings in a cache, as `napari-sam embed` makes it: --cache alone "
                     "where embed puts it by default (beside a Zarr image, else the user cache), --cache FOLDER "
                     "there (default: no cache, the embeddings are computed for this run only). With a cache, "
                     "--mode prompts scales a volume's intensities by the whole image's statistics, as embed does, "
                     "not by the prompted plane's own")
    _add_output_args(seg, "an input")
    seg.add_argument("--add", action="store_true",
                     help="--mode prompts with --labels-into: add the objects to the label image labels/NAME if it "
                     "exists (next free ids; its objects' pixels are kept), so a volume can be annotated plane by "
                     "plane in several runs; created if missing")
    emb = sub.add_parser(
        "embed",
        help="compute the SAM embeddings of every plane (tile by tile) into a Zarr cache",
        description="Resumable: run it again after an interruption and only missing or damaged tiles are "
        "computed. A cache computed differently (another model, tiling, image...) is kept beside the new "
        "entries unless --on-mismatch says otherwise.",
    )
    emb.add_argument("image", help="Zarr (v2, v3, OME-Zarr), TIFF, .npy, PNG or JPEG (a bool mask image is read as "
                     "0/255)")
    _add_model_args(emb)
    emb.add_argument("--out", help="cache folder (.zarr); default: beside a Zarr image, else the user cache")
    emb.add_argument("--axes",
                     help="axis letters from TZCYX, e.g. ZYX (default: OME-Zarr metadata or a guess from the shape)")
    emb.add_argument("--channel", type=_channel, help="channel to embed when the image has a C axis" + _STAIN_HELP)
    emb.add_argument("--tile", type=int, default=None,
                     help="tile interior side in pixels (default: from --magnification; 3/4 of the model input, 768 "
                     "for SAM, at magnification 1)")
    emb.add_argument("--halo", type=int, default=None,
                     help="context around each tile in pixels, at most --tile (default: 1/8 of the model input, "
                     "128 for SAM)")
    _add_scale_args(emb)
    emb.add_argument("--planes", type=int, nargs="+", metavar="I", help="flat plane numbers to embed (default: all)")
    emb.add_argument("--storage", choices=["float32", "float16"], default="float32", help="stored precision")
    emb.add_argument("--statistics", choices=["volume", "plane"], default="volume",
                     help="where intensity percentiles come from")
    emb.add_argument("--on-mismatch", choices=["keep", "error", "replace"], default="keep",
                     help="what to do with entries computed differently")
    emb.add_argument("--scheduler",
                     help="local:N for N worker processes, or a dask scheduler address (default: here, serially)")

    prop = sub.add_parser(
        "propagate",
        help="follow annotated objects through the planes of a volume (Z, or T)",
        description="SEEDS is a label image of the volume's shape in which each object is drawn on at least one "
        "plane; every object is propagated from the plane where it is largest, both ways, and written under its "
        "id. With a SAM 2.1 --model (sam2.1_hiera_tiny ... or its .pt checkpoint) the objects are propagated all "
        "at once with SAM 2's memory, both ways from every plane they are drawn on (each plane between two drawn "
        "planes goes to the nearer one), until SAM 2 finds the object absent on two planes in a row; planes "
        "larger than the model input are followed on a window around each object. Other objects are never "
        "overwritten. The result goes to --out and/or into an OME-Zarr image with --labels-into (SEEDS is left "
        "as it is).",
    )
    prop.add_argument("image", help="the volume: Zarr, TIFF or .npy")
    prop.add_argument("seeds", help="label image with the objects to propagate")
    _add_model_args(prop)
    _add_output_args(prop, "the image or the seeds")
    prop.add_argument("--axes", help="axis letters from TZCYX (default: guessed)")
    prop.add_argument("--channel", type=_channel, help="channel to use when the image has a C axis" + _STAIN_HELP)
    _add_scale_args(prop)
    prop.add_argument("--axis", choices=["Z", "T"], help="plane axis to follow (default: the innermost)")
    prop.add_argument("--ids", type=int, nargs="+", help="object ids to propagate (default: all)")
    prop.add_argument("--cache", help="embedding cache folder, also of SAM 2's features (default: beside a Zarr "
                      "image, else the user cache)")

    ev = sub.add_parser(
        "evaluate",
        help="measure segmentation quality against ground truth (point, box, corrections; auto; propagation)",
        description="IMAGES is a folder with images/ and labels/ image files (TIFF, PNG, JPEG, .npy) of the same "
        "names, a Zarr group with "
        "'images' and 'labels' arrays, or a folder of images with LABELS a folder of label images. Every "
        "ground-truth object is prompted with one point (the interior point farthest from the boundary), with "
        "its box, and with up to --corrections extra points on the largest error, as SAM and micro-sam "
        "evaluate. 3D label volumes (Z, Y, X) measure propagation instead: each object starts from its "
        "ground-truth mask on its middle plane and the mean 3D IoU is reported (the baseline propagates with the "
        "seeded watershed). Prints a table; --json writes the numbers.",
    )
    ev.add_argument("images")
    ev.add_argument("labels", nargs="?")
    ev.add_argument("--model", help="model to evaluate (registry name or checkpoint); without it only the baseline")
    ev.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: the best available)")
    ev.add_argument("--dtype", default="float32",
                    help="the model's precision (default float32, so that figures compare across machines; auto: "
                    "what the device runs fastest)")
    _add_scale_args(ev)
    ev.add_argument("--baseline", action="store_true", help="also the classical baseline (seeded watershed)")
    ev.add_argument("--auto", action="store_true",
                    help="also automatic segmentation: every mode the model offers, with its recommended settings, "
                    "beside a classical baseline (mSA, AP50, AP75, seconds per plane)")
    ev.add_argument("--auto-modes", metavar="MODES",
                    help="with --auto (implied): comma-separated modes to measure, from ais, apg, auto, boxes "
                    "(default: all the model offers; ais and apg need an instance decoder)")
    ev.add_argument("--augment", action="store_true",
                    help="with --auto: also AIS with test-time augmentation (segment --augment), as its own row")
    ev.add_argument("--channel", type=_channel,
                    help="for multichannel images (channels last): the channel to segment, e.g. the nuclei's"
                    + _STAIN_HELP + "; a name is how the model reads RGB, the baseline keeps its own reading")
    ev.add_argument("--pattern", default="*", metavar="GLOB",
                    help="which image files of the folder to take (default: every image file), e.g. '*.tif'")
    ev.add_argument("--corrections", type=_count, default=8,
                    help="corrective clicks after the first one, each on the largest error (default 8)")
    ev.add_argument("--max-objects", type=_positive_int, help="objects sampled per image (default: all)")
    ev.add_argument("--seed", type=int, default=0,
                    help="seeds the sampling of --max-objects and the choice among tied correction points (default 0)")
    ev.add_argument("--json", help="write the results as JSON (scores of no objects as null); '-': to stdout, "
                    "with the table and everything else on stderr")
    ev.add_argument("--overwrite", action="store_true", help="replace --json if it exists")

    tr = sub.add_parser(
        "train",
        help="fine-tune a model on your own annotations (decoder only on cached embeddings, or the whole model)",
        description="DATA is a folder with images/ and labels/ image files (TIFF, PNG, JPEG, .npy) of the same "
        "names (a 3D file counts as a "
        "stack of planes), or an image file with --labels. SAM's recipe: simulated point and box prompts, "
        "corrective points from the error region, focal+dice loss plus the IoU-prediction loss; the loss "
        "weights, corrective rounds and mask prompts are those the model was trained with where its checkpoint "
        "records them (else SAM's 20:1 and three rounds), boxes all but exact unless --box-noise, lone clicks "
        "mostly near their object's middle unless --central-clicks, AdamW with warm-up and decay, on the tiles "
        "the plugin embeds (planes at their own resolution); the weights of the best "
        "validation are kept. The checkpoint loads with --model everywhere.",
    )
    tr.add_argument("data", help="folder of images/ and labels/, or one image file")
    tr.add_argument("--labels", help="label image for a single image file given as DATA")
    _add_model_args(tr, dtype=False)
    tr.add_argument("--out", required=True, help="checkpoint to write (.pth)")
    tr.add_argument("--mode", choices=["decoder", "full", "instance-decoder"],
                    help="decoder (default): the prompt encoder and mask decoder on cached embeddings; full: "
                    "the whole model; instance-decoder: a new instance decoder for automatic segmentation (--mode "
                    "ais, apg) on the model's embeddings, its SAM weights unchanged")
    tr.add_argument("--steps", type=_positive_int, help="optimizer steps (default 1000, or what --minutes holds)")
    tr.add_argument("--minutes", type=_positive,
                    help="a time budget: the run is sized to end in about this many minutes (with --steps, and "
                    "in --mode instance-decoder: stop after this many minutes, once a decoder is there to save)")
    tr.add_argument("--learning-rate", type=_positive,
                    help="peak learning rate (default 1e-4)")
    tr.add_argument("--box-noise", type=_non_negative, metavar="FRACTION",
                    help="jitter of the training boxes, a fraction of each side (default 0.02: close to the "
                    "labels' exact boxes; SAM learned with 0.1)")
    tr.add_argument("--central-clicks", type=_fraction, metavar="P",
                    help="share of lone clicks drawn in the inner half of their object, where people click "
                    "(default 0.75; SAM drew them anywhere in it: 0)")
    tr.add_argument("--mask-loss-upscale", type=int, choices=(1, 2, 4), metavar="{1,2,4}",
                    help="compare masks with the labels on the decoder's low-res grid (1, the default) or on a grid "
                    "2 or 4 times finer, the logits enlarged as inference enlarges them (4: the model input)")
    tr.add_argument("--channel", type=_channel,
                    help="for multichannel images (channels last): the channel to learn from, e.g. the nuclei's"
                    + _STAIN_HELP)
    tr.add_argument("--pattern", default="*", metavar="GLOB",
                    help="which image files of the folders to take (default: every image file), e.g. '*.tif'")
    tr.add_argument("--validation", help="folder of validation pairs (default: a 10%% split of DATA)")
    tr.add_argument("--seed", type=int, help="seeds the validation split and every random draw (default 0)")
    tr.add_argument("--resume", action="store_true",
                    help="continue from --out if it exists, with the settings it was started with")

    ann = sub.add_parser(
        "annotate",
        help="open napari with an image (or a bundled sample) and the Segment Anything widget docked",
    )
    ann.add_argument("image", nargs="?", help="image to open (default: --sample)")
    ann.add_argument("--sample", default="nuclei_3d", choices=["nuclei_2d", "nuclei_3d"],
                     help="bundled sample to open when no image is given (default: nuclei_3d)")
    ann.add_argument("--model", help="model preselected in the widget (registry name or checkpoint file)")
    ann.add_argument("--start", action="store_true", help="load the model and create the prompt layers right away")
    ann.add_argument("--screenshot", help=argparse.SUPPRESS)

    info = sub.add_parser(
        "info", help="show what an embedding cache holds",
        description="Without --verify the tiles are counted from their recorded checksums, not read. With "
        "--verify every tile is read against its checksum and damaged or missing ones are listed (plane, tile "
        "row, col); the exit status is 3 when any is found (1 is kept for bugs, 2 for mistakes in the "
        "request), 0 when the cache is clean.",
    )
    info.add_argument("cache")
    info.add_argument("--verify", action="store_true", help="read every tile against its checksum (slow)")
    info.add_argument("--json", action="store_true",
                      help="print the report as JSON (for scripts; the exit status is the same)")

    caches = sub.add_parser(
        "caches", help="list the embedding caches in the user cache folder; remove old or excess ones",
        description="Images without a Zarr store to sit beside (TIFFs, arrays) keep their embeddings in the user "
        "cache folder ($NAPARI_SAM_CACHE_DIR/embeddings), one cache per image content; nothing there is removed "
        "by itself. Without options the caches are listed, least recently used first. --older-than and "
        "--max-size remove caches not opened for that long, then the least recently used until the rest fit; "
        "a cache being written (an embed in progress) is kept. Caches beside Zarr images are not touched.",
    )
    caches.add_argument("--older-than", type=_positive, metavar="DAYS", help="remove caches unused for DAYS days")
    caches.add_argument("--max-size", type=_non_negative, metavar="GB",
                        help="remove the least recently used caches until the rest hold at most GB gigabytes")
    caches.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    caches.add_argument("--json", action="store_true",
                        help="print the listing, or what was (or would be) removed, as JSON (sizes in bytes)")

    from .share import add_share_commands

    add_share_commands(sub)
    return parser
