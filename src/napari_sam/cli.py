"""The ``napari-sam`` command line.

    napari-sam models
    napari-sam segment IMAGE --model NAME_OR_CHECKPOINT --point X Y [--box X0 Y0 X1 Y1] --out labels.tif
    napari-sam embed IMAGE --model NAME_OR_CHECKPOINT --out CACHE.zarr [--axes ZYX] [--scheduler local:2]
    napari-sam info CACHE.zarr

Coordinates are pixels of the image as (x, y), that is (column, row).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

__all__ = ["main"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name (see `napari-sam models`) or checkpoint file")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="encoder precision: float32 (exact), bfloat16, float16 (GPU) or auto (default: "
        "bfloat16 where the hardware computes it natively, else float32)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-sam", description="Segment Anything for microscopy.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the models that can be loaded by name")

    dl = sub.add_parser("download", help="download a model into the cache (checksum verified)")
    dl.add_argument("name")

    seg = sub.add_parser(
        "segment",
        help="segment objects from point or box prompts (--mode prompts), or everything (--mode auto|boxes)",
        description="--mode prompts (default): each --box is one object (points, if given with a single box, "
        "refine it); without boxes all points describe one object. --prompts reads many objects from JSON. "
        "Objects get ids 1, 2, ... in order and never overwrite each other. --mode auto: a grid of point "
        "prompts on every plane, filtered by predicted IoU and stability, duplicates removed; planes of a "
        "volume are linked into 3D objects. --mode boxes: boxes from a classical detector (Otsu or LoG), "
        "each turned into one object.",
    )
    seg.add_argument("--mode", choices=["prompts", "auto", "boxes"], default="prompts")
    seg.add_argument("--points-per-side", type=int, default=32, help="auto mode: grid density per tile")
    seg.add_argument("--detector", choices=["otsu", "log"], default=None,
                     help="boxes mode: the detector (default: the one measured to suit the model; otsu for SAM's own)")
    seg.add_argument("--min-area", type=int, default=25, help="auto and boxes modes: smaller objects are dropped")
    seg.add_argument("--axes", help="auto and boxes modes: axis letters from TZCYX (default: guessed)")
    seg.add_argument("image", help="TIFF, Zarr, .npy, PNG or JPEG")
    _add_model_args(seg)
    seg.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"), default=[], help="foreground point (x = column, y = row); repeatable")
    seg.add_argument("--bg-point", nargs=2, type=float, action="append", metavar=("X", "Y"), default=[], help="background point; repeatable")
    seg.add_argument("--box", nargs=4, type=float, action="append", metavar=("X0", "Y0", "X1", "Y1"), default=[], help="box around one object; repeatable")
    seg.add_argument("--prompts", help="JSON file: a list of {points, labels, box} objects")
    seg.add_argument("--plane", type=int, nargs="*", default=[], metavar="I", help="index of the 2D plane in a 3D/4D image (leading axes)")
    seg.add_argument("--channel", type=int, help="channel to use in a multichannel image (channels last)")
    seg.add_argument("--out", required=True, help="label image to write: .tif, .zarr or .npy")
    seg.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    emb = sub.add_parser(
        "embed",
        help="compute the SAM embeddings of every plane (tile by tile) into a Zarr cache",
        description="Resumable: run it again after an interruption and only missing or damaged tiles are "
        "computed. A cache computed differently (another model, tiling, image...) is kept beside the new "
        "entries unless --on-mismatch says otherwise.",
    )
    emb.add_argument("image", help="Zarr (v2, v3, OME-Zarr), TIFF, .npy, PNG or JPEG")
    _add_model_args(emb)
    emb.add_argument("--out", help="cache folder (.zarr); default: beside a Zarr image, else the user cache")
    emb.add_argument("--axes", help="axis letters from TZCYX, e.g. ZYX (default: OME-Zarr metadata or a guess from the shape)")
    emb.add_argument("--channel", type=int, help="channel to embed when the image has a C axis")
    emb.add_argument("--tile", type=int, default=None, help="tile interior side in pixels (default: 3/4 of the model input, 768 for SAM)")
    emb.add_argument("--halo", type=int, default=None, help="context around each tile in pixels (default: 1/8 of the model input, 128 for SAM)")
    emb.add_argument("--planes", type=int, nargs="*", metavar="I", help="flat plane numbers to embed (default: all)")
    emb.add_argument("--storage", choices=["float32", "float16"], default="float32", help="stored precision")
    emb.add_argument("--statistics", choices=["volume", "plane"], default="volume", help="where intensity percentiles come from")
    emb.add_argument("--on-mismatch", choices=["keep", "error", "replace"], default="keep", help="what to do with entries computed differently")
    emb.add_argument("--scheduler", help="local:N for N worker processes, or a dask scheduler address (default: here, serially)")

    prop = sub.add_parser(
        "propagate",
        help="follow annotated objects through the planes of a volume (Z, or T)",
        description="SEEDS is a label image of the volume's shape in which each object is drawn on at least one "
        "plane; every object is propagated from the plane where it is largest, both ways, and written under its "
        "id. Other objects are never overwritten. The result goes to --out (SEEDS is left as it is).",
    )
    prop.add_argument("image", help="the volume: Zarr, TIFF or .npy")
    prop.add_argument("seeds", help="label image with the objects to propagate")
    _add_model_args(prop)
    prop.add_argument("--out", required=True, help="label image to write: .tif, .zarr or .npy")
    prop.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    prop.add_argument("--axes", help="axis letters from TZCYX (default: guessed)")
    prop.add_argument("--channel", type=int, help="channel to use when the image has a C axis")
    prop.add_argument("--axis", choices=["Z", "T"], help="plane axis to follow (default: the innermost)")
    prop.add_argument("--ids", type=int, nargs="*", help="object ids to propagate (default: all)")
    prop.add_argument("--cache", help="embedding cache folder (default: beside a Zarr image, else the user cache)")

    ev = sub.add_parser(
        "evaluate",
        help="measure segmentation quality against ground truth (point, box, corrections; auto; propagation)",
        description="IMAGES is a folder with images/ and labels/ TIFFs of the same names, a Zarr group with "
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
    ev.add_argument("--device", default="auto")
    ev.add_argument("--dtype", default="float32")
    ev.add_argument("--baseline", action="store_true", help="also the classical baseline (seeded watershed)")
    ev.add_argument("--auto", action="store_true", help="also automatic segmentation (mSA, AP50, AP75)")
    ev.add_argument("--corrections", type=int, default=8)
    ev.add_argument("--max-objects", type=int, help="objects sampled per image (default: all)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", help="write the results as JSON")

    tr = sub.add_parser(
        "train",
        help="fine-tune a model on your own annotations (decoder only on cached embeddings, or the whole model)",
        description="DATA is a folder with images/ and labels/ TIFFs of the same names (a 3D file counts as a "
        "stack of planes), or an image file with --labels. SAM's recipe: simulated point and box prompts, "
        "corrective points from the error region, 20:1 focal+dice loss plus the IoU-prediction loss, AdamW "
        "with warm-up and decay. The checkpoint loads with --model everywhere.",
    )
    tr.add_argument("data", help="folder of images/ and labels/, or one image file")
    tr.add_argument("--labels", help="label image for a single image file given as DATA")
    _add_model_args(tr)
    tr.add_argument("--out", required=True, help="checkpoint to write (.pth)")
    tr.add_argument("--mode", choices=["decoder", "full"], default="decoder")
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--minutes", type=float, help="stop after this many minutes (the checkpoint is saved)")
    tr.add_argument("--learning-rate", type=float)
    tr.add_argument("--validation", help="folder of validation pairs (default: a 10%% split of DATA)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resume", action="store_true", help="continue from --out if it exists")

    ann = sub.add_parser(
        "annotate",
        help="open napari with an image (or a bundled sample) and the Segment Anything widget docked",
    )
    ann.add_argument("image", nargs="?", help="image to open (default: --sample)")
    ann.add_argument("--sample", default="nuclei_3d", choices=["nuclei_2d", "nuclei_3d"], help="bundled sample to open when no image is given")
    ann.add_argument("--model", help="model preselected in the widget (registry name or checkpoint file)")
    ann.add_argument("--start", action="store_true", help="load the model and create the prompt layers right away")
    ann.add_argument("--screenshot", help=argparse.SUPPRESS)

    info = sub.add_parser("info", help="show what an embedding cache holds")
    info.add_argument("cache")
    return parser


def _object_prompts(args):
    from .core.prompts import ObjectPrompt, load_prompts

    objects = load_prompts(args.prompts) if args.prompts else []
    points = args.point + args.bg_point
    labels = [1] * len(args.point) + [0] * len(args.bg_point)
    if len(args.box) > 1 and points:
        raise ValueError("points can refine a single --box only; use --prompts for several objects with points")
    if args.box:
        objects += [ObjectPrompt.make(points or None, labels or None, b) for b in args.box]
    elif points:
        objects.append(ObjectPrompt.make(points, labels))
    if not objects:
        raise ValueError("no prompts: give --point, --box or --prompts")
    return objects


def _plane(image, plane_index, channel):
    import numpy as np

    index = tuple(plane_index)
    spatial = image.ndim - len(index) - (1 if channel is not None else 0)
    if spatial != 2 and not (spatial == 3 and channel is None and image.shape[-1] in (3, 4)):
        raise ValueError(
            f"the image has shape {tuple(image.shape)}: choose a 2D plane with --plane "
            f"(one index per leading axis){' and --channel' if channel is None else ''}"
        )
    return np.asarray(image[index] if index else image[...])


def _segment(args) -> int:
    import numpy as np

    from .core.io import label_dtype, read_image, write_labels
    from .core.labels import paint
    from .core.embeddings import Embeddings
    from .core.models import load_model

    from pathlib import Path

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    if args.mode != "prompts":
        return _segment_all(args)
    objects = _object_prompts(args)
    plane = _plane(read_image(args.image), args.plane, args.channel)
    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    # As the plugin answers a click: a plane larger than the model input is embedded in
    # full-resolution tiles and objects are followed across them.
    emb = Embeddings(plane, model, cache=False, axes="YX" if plane.ndim == 2 else "YXC", channel=args.channel,
                     statistics="plane")
    emb.compute_all(progress=False)
    t_embed = time.perf_counter() - t0
    labels = np.zeros(plane.shape[:2], label_dtype(len(objects)))
    rows, cols = emb.grid.grid_shape
    print(f"embedded {plane.shape[1]}x{plane.shape[0]} image ({rows}x{cols} tile(s)) with {model.source.name} "
          f"({model.source.dtype}) in {t_embed:.1f} s")
    for i, obj in enumerate(objects, start=1):
        found = emb.segment(0, **obj.predict_kwargs(), multimask=obj.box is None and len(obj.points) == 1)
        mask = found.to_full(labels.shape)
        written = paint(labels, mask, i)
        kept = "" if written == mask.sum() else f" ({int(mask.sum()) - written} px already taken by earlier objects)"
        print(f"object {i}: {written} px{kept}, predicted IoU {found.iou:.3f}")
    out = write_labels(args.out, labels, overwrite=args.overwrite)
    print(f"wrote {len(objects)} object(s) to {out}")
    return 0


def _segment_all(args) -> int:
    """--mode auto|boxes: every plane, each into its own label plane (linked in 3D for auto)."""
    import numpy as np
    from tqdm.auto import tqdm

    from .core import automatic
    from .core.embeddings import Embeddings
    from .core.image_source import ImageSource
    from .core.io import write_labels
    from .core.models import load_model

    source = ImageSource.open(args.image, axes=args.axes, channel=args.channel)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    emb = Embeddings(source, model, cache=False)
    advice = automatic.recommended(model)  # the grid's filters and the detector suited to the model
    detector = args.detector or advice.detector
    planes = []
    for flat in tqdm(range(source.n_planes), desc=f"segmenting ({args.mode})", unit="plane"):
        if args.mode == "auto":
            config = dataclasses.replace(advice.grid, points_per_side=args.points_per_side, min_area=args.min_area)
            result = automatic.run(automatic.iter_grid(emb, flat, config))
        else:
            boxes = automatic.detect_boxes(source.read(flat), method=detector, min_area=args.min_area)
            result = automatic.run(automatic.iter_from_boxes(emb, flat, boxes, min_area=args.min_area))
        planes.append(result.labels)
    if len(planes) > 1 and args.mode == "auto":
        labels = automatic.link_planes(planes)
    elif len(planes) > 1:
        # boxes mode: ids made unique over the volume (linking is the auto mode's job)
        offset, out = 0, []
        for p in planes:
            out.append(np.where(p > 0, p.astype(np.uint32) + offset, 0))
            offset += int(p.max())
        labels = np.stack(out)
    else:
        labels = planes[0]
    labels = labels.reshape(source.plane_grid + source.plane_shape)
    out = write_labels(args.out, labels, overwrite=args.overwrite)
    print(f"wrote {len(np.unique(labels)) - 1} object(s) to {out}")
    return 0


def _evaluate(args) -> int:
    import json

    import numpy as np

    from .core import evaluation
    from .core.baseline import WatershedBaseline

    if args.labels:
        pairs = evaluation.load_pairs(_pairs_of_folders(args.images, args.labels))
    else:
        pairs = evaluation.load_pairs(args.images)
    results = []
    methods = []
    if args.model:
        from .core.models import load_model
        from .core.predictor import Predictor

        model = load_model(args.model, device=args.device, dtype=args.dtype)
        methods.append((Predictor(model), model.source.name))
    if args.baseline or not methods:
        methods.append((WatershedBaseline(), "watershed baseline"))
    planes = [p for p in pairs if np.asarray(p.labels).ndim == 2]
    volumes = [p for p in pairs if np.asarray(p.labels).ndim == 3]
    if len(planes) + len(volumes) != len(pairs):
        raise ValueError("labels must be 2D planes or 3D (Z, Y, X) volumes")
    for method, name in methods:
        sam = not isinstance(method, WatershedBaseline)
        if planes:
            results.append(evaluation.evaluate_prompted(planes, method, n_corrections=args.corrections,
                                                        max_objects=args.max_objects, seed=args.seed, name=name))
            if args.auto and sam:
                segment = evaluation.grid_segmenter(method.model)
                results.append(evaluation.evaluate_automatic(planes, segment, name=f"{name} (auto)"))
        if volumes:
            # Volumes: each object is propagated from its ground-truth mask on its middle plane.
            propagate = evaluation.sam_propagator(method.model) if sam else evaluation.watershed_propagator()
            merged = None
            for pair in volumes:
                r = evaluation.evaluate_propagation(propagate, pair.image, pair.labels, max_objects=args.max_objects,
                                                    seed=args.seed, name=f"{name} (propagation)")
                for o in r["per_object"]:
                    o["volume"] = pair.name
                merged = r if merged is None else merged | {"per_object": merged["per_object"] + r["per_object"]}
            merged["objects"] = len(merged["per_object"])
            merged["mean_iou"] = float(np.mean([o["iou"] for o in merged["per_object"]])) if merged["objects"] else float("nan")
            results.append(merged)
    print(evaluation.format_table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


def _pairs_of_folders(images, labels):
    """(image, labels) arrays of the files with the same names in two folders."""
    from pathlib import Path

    import tifffile

    images, labels = Path(images), Path(labels)
    names = sorted(p.name for p in images.glob("*.tif*"))
    missing = [n for n in names if not (labels / n).exists()]
    if not names or missing:
        raise ValueError(f"{images} and {labels} must hold TIFFs of the same names (missing labels: {missing[:5]})")
    return [(tifffile.imread(images / n), tifffile.imread(labels / n)) for n in names]


def _embed(args) -> int:
    from .core.embeddings import Embeddings
    from .core.image_source import ImageSource
    from .core.models import load_model

    source = ImageSource.open(args.image, axes=args.axes, channel=args.channel)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    emb = Embeddings(
        source,
        model,
        args.out,
        tile=args.tile,
        halo=args.halo,
        statistics=args.statistics,
        storage=args.storage,
        on_mismatch=args.on_mismatch,
    )
    rows, cols = emb.grid.grid_shape
    print(f"{source.describe()}; {rows}x{cols} tile(s) per plane; cache {emb.cache_path} ({emb.store.key})")
    t0 = time.perf_counter()
    done = emb.compute_all(planes=args.planes, scheduler=args.scheduler)
    print(f"{done} tile(s) cached in {time.perf_counter() - t0:.1f} s")
    return 0


def _info(args) -> int:
    from .core.embedding_store import describe_cache

    entries = describe_cache(args.cache)
    if not entries:
        print(f"{args.cache}: an embedding cache with no entries yet")
    for e in entries:
        s = e["signature"]
        print(f"[{e['key']}] {s['model']} ({s['dtype']}, {s['checkpoint'][:23]}...)")
        print(f"  image     {'x'.join(map(str, s['shape']))} {s['axes']} {s['dtype_in']}, channel {s['channel']}, {s['image_fingerprint'][:23]}...")
        print(f"  tiles     {e['layout'][1]}x{e['layout'][2]} per plane, tile {s['tile']} + halo {s['halo']}")
        print(f"  intensity {s['normalization']}")
        print(f"  entries   {e['present']}/{e['total']} present, {e['bytes'] / 2**20:.1f} MiB on disk, stored as {s['storage']}")
    return 0


def _propagate(args) -> int:
    from pathlib import Path

    import numpy as np

    from .api import Annotator
    from .core.image_source import ImageSource
    from .core.io import read_image, write_labels

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    source = ImageSource.open(args.image, axes=args.axes, channel=args.channel)
    seeds = np.asarray(read_image(args.seeds))
    labels = seeds.astype(np.uint32, copy=True)
    ann = Annotator(source, args.model, labels, cache=args.cache, device=args.device, dtype=args.dtype)
    result = ann.propagate_all(axis=args.axis, ids=args.ids)
    for label_id, planes in result.items():
        print(f"object {label_id}: written on {len(planes)} more plane(s)")
    out = write_labels(args.out, ann.labels, overwrite=args.overwrite)
    print(f"wrote {len(result)} propagated object(s) to {out}")
    return 0


def _train(args) -> int:
    from pathlib import Path

    from tqdm.auto import tqdm

    from .core.io import read_image
    from .core.models import load_model
    from .core.training import SegmentationDataset, Trainer, TrainingConfig

    if args.labels:
        image, labels = read_image(args.data), read_image(args.labels)
        data = (SegmentationDataset.from_stack if labels.ndim == 3 else SegmentationDataset.from_arrays)(
            *((image, labels) if labels.ndim == 3 else ([image], [labels]))
        )
    else:
        data = SegmentationDataset.from_folder(args.data)
    if args.validation:
        train, val = data, SegmentationDataset.from_folder(args.validation)
    else:
        train, val = data.split(0.1, seed=args.seed) if len(data) > 1 else (data, None)
    config = TrainingConfig(mode=args.mode, steps=args.steps, learning_rate=args.learning_rate, seed=args.seed)
    out = Path(args.out)
    if args.resume and out.exists():
        trainer = Trainer.resume(out, train, val, device=args.device)
    else:
        if out.exists():
            raise FileExistsError(f"{out} exists; pass --resume to continue it, or choose another --out")
        trainer = Trainer(load_model(args.model, device=args.device, dtype="float32"), train, config, validation_data=val)
    print(f"training on {len(train)} pair(s), validating on {len(val) if val is not None else 0}; {config.mode} mode")
    end = time.monotonic() + 60 * args.minutes if args.minutes else None
    with tqdm(total=trainer.config.steps, initial=trainer.step, unit="step", desc="training") as bar:
        for record in trainer.run():
            bar.update(1)
            post = {"loss": f"{record.loss:.3f}"}
            if record.validation_iou is not None:
                post["val_iou"] = f"{record.validation_iou:.3f}"
            bar.set_postfix(post)
            if end is not None and time.monotonic() > end:
                break
    trainer.save(out)
    print(f"saved {out} after {trainer.step} step(s)")
    return 0


def _annotate(args) -> int:
    import os

    if args.model:
        os.environ["NAPARI_SAM_MODEL"] = args.model
    import napari

    viewer = napari.Viewer(title="napari-sam")
    if args.image:
        viewer.open(args.image)
    else:
        viewer.open_sample("napari-sam-scale", args.sample)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-scale", "Segment Anything")
    if args.start:
        widget.start_session()
    if args.screenshot:
        from qtpy.QtWidgets import QApplication

        deadline = time.monotonic() + 60
        while args.start and widget.session is None and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.05)
        viewer.screenshot(args.screenshot, canvas_only=False)
        viewer.close()
        return 0
    napari.run()
    return 0


def _models(args) -> int:
    from .weights import list_models

    for entry in list_models():
        print(f"{entry.name:24s} {entry.description}")
    return 0


def _download(args) -> int:
    from .weights import fetch_checkpoint

    print(fetch_checkpoint(args.name))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    handlers = {"segment": _segment, "models": _models, "download": _download, "embed": _embed, "info": _info, "annotate": _annotate, "propagate": _propagate, "train": _train, "evaluate": _evaluate}
    try:
        return handlers[args.command](args)
    except (ValueError, FileExistsError, KeyError, RuntimeError) as err:
        print(f"napari-sam {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
