"""``napari-sam segment`` (prompts, or every object) and ``napari-sam propagate``; their labels go to a
file (--out) and/or into an OME-Zarr image as an NGFF label image (--labels-into)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import UsageError
from .parser import DEFAULT_CACHE

__all__ = ["propagate", "segment"]


def _object_prompts(args):
    """The objects the command line describes: each --box is one object (points refine a
    single box only); without boxes, all points are one object; --prompts adds its own."""
    from ..core.prompts import Prompt, load_prompts

    objects = load_prompts(args.prompts) if args.prompts else []
    points = args.point + args.bg_point
    labels = [1] * len(args.point) + [0] * len(args.bg_point)
    if len(args.box) > 1 and points:
        raise ValueError("points can refine a single --box only; use --prompts for several objects with points")
    if args.box:
        objects += [Prompt.make(points or None, labels or None, b) for b in args.box]
    elif points:
        objects.append(Prompt.make(points, labels))
    if not objects:
        raise ValueError("no prompts: give --point, --box or --prompts")
    return objects


def _inputs(args) -> dict:
    """The paths a command reads, by what they are: no output may be one of them."""
    names = {"image": "image", "seeds": "seeds", "prompts": "--prompts file", "cache": "--cache"}
    return {label: getattr(args, key) for key, label in names.items() if getattr(args, key, None) is not None}


DEFAULT_LABEL_NAME = "napari-sam"
"""The label image that --labels-into writes when --label-name is not given."""


def _label_name(args) -> str:
    # an empty --label-name is refused by the name check, not replaced by the default
    return DEFAULT_LABEL_NAME if args.label_name is None else args.label_name


def _check_out(args) -> None:
    """--out, checked before any work; one of --out and --labels-into is required."""
    from ..core.outputs import check_output

    if args.out is None and args.labels_into is None:
        raise UsageError("no output: give --out (a .tif, .zarr or .npy file), --labels-into (an OME-Zarr image), "
                         "or both")
    if args.label_name is not None and args.labels_into is None:
        raise UsageError(f"--label-name {args.label_name} names a label image of --labels-into, which is not given")
    if args.out is not None:
        check_output(args.out, _inputs(args), overwrite=args.overwrite)


def _adding(args) -> bool:
    """Whether objects are added to an existing label image (--add) rather than written anew."""
    if not getattr(args, "add", False):
        return False
    if args.labels_into is None or args.mode != "prompts":
        raise UsageError("--add adds prompted objects to a label image: it needs --labels-into and --mode prompts")
    if args.overwrite:
        raise UsageError("--add keeps the label image's objects and --overwrite replaces the label image: "
                         "give one of them")
    return True


def _check_labels_into(args, shape: tuple[int, ...]) -> None:
    """--labels-into, checked before the model loads: an OME-Zarr image whose labels have ``shape``."""
    from ..core.ngff import check_label_target, open_label_image

    if args.labels_into is None:
        return
    name = _label_name(args)
    if _adding(args) and (Path(args.labels_into).expanduser() / "labels" / name).exists():
        # continued, not replaced: opening it checks that it is a label image that fits the image
        open_label_image(args.labels_into, name, create=False)
        return
    check_label_target(args.labels_into, name, shape=shape, overwrite=args.overwrite)


def _add_objects(args, labels, index: tuple[int, ...]) -> None:
    """--add: commit the plane's objects into labels/NAME under its next free ids."""
    import numpy as np

    from ..core.labels import LabelWriter
    from ..core.masks import PlaneMask
    from ..core.ngff import open_label_image

    image = open_label_image(args.labels_into, _label_name(args))
    writer = LabelWriter(image.data, on_write=image.update)
    masks = [PlaneMask.from_full(labels == i) for i in np.unique(labels) if i]
    if not masks:
        print(f"nothing added to {image.container}: every prompt gave an empty mask")
        return
    commit = writer.commit(index, masks)
    kept = sum(m.area for m in masks) - sum(commit.pixels)
    note = f" ({kept} px kept for objects already there)" if kept else ""
    where = f" (plane {index})" if index else ""
    print(f"added {sum(1 for i in commit.ids if i)} object(s) as ids {[i for i in commit.ids if i]} to the label "
          f"image {image.path.relative_to(image.container)} of {image.container}{where}{note}")


def _write(args, labels, what: str, note: str = "", plane: tuple[int, ...] | None = None) -> None:
    """Write the labels to --out and/or into --labels-into; print where they went."""
    from ..core.io import write_labels
    from ..core.ngff import write_label_image

    if args.out is not None:
        out = write_labels(args.out, labels, overwrite=args.overwrite, inputs=_inputs(args))
        print(f"wrote {what} to {out}{note}")
    if args.labels_into is not None:
        image = write_label_image(args.labels_into, _label_name(args), labels,
                                  overwrite=args.overwrite, plane=plane or None)
        where = f" (plane {plane})" if plane else ""
        print(f"wrote {what} into {image.container} as the label image {image.path.relative_to(image.container)}"
              f"{where}, {len(image.levels)} resolution level(s){note}")


def segment(args) -> int:
    import numpy as np

    from ..core.embeddings import Embeddings
    from ..core.image_source import ImageSource
    from ..core.io import label_dtype
    from ..core.labels import paint
    from ..core.models import resolve_model
    from ..core.object_scale import segment_at_object_scale
    from .inputs import source_plane

    _check_out(args)  # before any work
    _check_cache(args)
    if args.augment and args.mode != "ais":
        raise UsageError(f"--augment averages the instance decoder's maps of --mode ais, not of --mode {args.mode}")
    if args.mode != "prompts":
        return _segment_all(args)
    objects = _object_prompts(args)
    # The axes the file declares (OME-Zarr, OME-TIFF, ImageJ), --axes, or a guess; --channel
    # picks along C and --plane names a plane over T and Z, as in every other command.
    source = ImageSource.open(args.image, axes=args.axes, channel=args.channel)
    index = source_plane(source, args.plane, args.image)
    for obj in objects:  # a point off the image is refused before the model loads and the image is embedded
        obj.on_plane(source.plane_shape)
    _check_labels_into(args, source.plane_grid + source.plane_shape)
    t0 = time.perf_counter()
    model = resolve_model(args.model, device=args.device, dtype=args.dtype)
    # As the plugin answers a click: a plane larger than the model input is embedded in
    # full-resolution tiles and objects are followed across them.
    # With a cache, the whole image's intensity statistics, as `embed` computes them, so
    # that its tiles are found; without, the plane's own, and no reading of other planes.
    emb = Embeddings(source, model, cache=_cache(args), statistics="plane" if args.cache is None else "volume",
                     magnification=args.magnification, diameter=args.diameter)
    flat = source.flat_index(index)
    emb.compute_all(planes=[flat], progress=False)
    t_embed = time.perf_counter() - t0
    labels = np.zeros(source.plane_shape, label_dtype(len(objects)))
    rows, cols = emb.grid.grid_shape
    height, width = source.plane_shape
    print(f"embedded {width}x{height} image ({rows}x{cols} tile(s), magnification "
          f"{emb.magnification:g}) with {model.source.name} ({model.source.dtype}) in {t_embed:.1f} s")
    empty = []
    for i, obj in enumerate(objects, start=1):
        found = segment_at_object_scale(emb, flat, obj)
        mask = found.to_full(labels.shape)
        written = paint(labels, mask, i)
        if not written:
            empty.append(i)
        kept = "" if written == mask.sum() else f" ({int(mask.sum()) - written} px already taken by earlier objects)"
        print(f"object {i}: {written} px{kept}, predicted IoU {found.iou:.3f}")
    # Ids follow the prompts' order, so an empty prompt leaves its id unused.
    note = f"; prompt(s) {', '.join(map(str, empty))} gave an empty mask (no id written)" if empty else ""
    if _adding(args):
        _add_objects(args, labels, index)
        if args.out is not None:  # the file gets this run's objects, as without --add
            _write(argparse.Namespace(**{**vars(args), "labels_into": None}), labels,
                   f"{len(objects) - len(empty)} object(s)", note)
        return 0
    _write(args, labels, f"{len(objects) - len(empty)} object(s)", note, plane=index)
    return 0


def _check_cache(args) -> None:
    from ..core.outputs import check_folder_writable, check_not_an_input

    if args.cache not in (None, DEFAULT_CACHE):
        check_not_an_input(args.cache, {k: v for k, v in _inputs(args).items() if k != "--cache"}, what="--cache")
        check_folder_writable(Path(args.cache).expanduser().parent)


def _cache(args):
    """What ``Embeddings(cache=...)`` takes for ``--cache``: False without it (memory only),
    None for its default place."""
    return False if args.cache is None else None if args.cache == DEFAULT_CACHE else args.cache


def _mode_settings(args) -> dict:
    """The settings of --mode that the command line gives (the model's advice for the rest)."""
    min_area = args.min_area
    given = {"min_area": min_area} if min_area is not None else {}
    if args.mode == "auto":  # what is not given is the model's advice, else the mode's defaults
        return {**given, **({} if args.points_per_side is None else {"points_per_side": args.points_per_side})}
    if args.mode == "boxes":
        return {**given, **({} if args.detector is None else {"detector": args.detector})}
    augment = {"augment": True} if args.augment else {}
    return augment if min_area is None else {"min_size": min_area, **augment}


def _check_mode(mode: str, model) -> None:
    """A decoder mode for a model without an instance decoder: one line naming models that have one."""
    from ..auto.modes import available_modes
    from ..weights import list_models

    if mode not in available_modes(model):
        # micro-sam's fine-tuned checkpoints all carry their instance decoder
        named = [e.name for e in list_models() if e.description.startswith("micro-sam")]
        raise UsageError(f"--mode {mode} needs a model with an instance decoder, which {model.source.name} lacks; "
                         f"the embedded default (offline) and {', '.join(named)} have one (--model NAME, see "
                         "`napari-sam models`)")


def _segment_all(args) -> int:
    """--mode ais|apg|auto|boxes: every plane; the planes of a stack linked into 3D objects
    (for TZYX, the Z stack of each time point, ids unique over the image)."""
    import numpy as np

    from ..auto.modes import iter_segment_plane, iter_segment_volume, reads_native_scale
    from ..core.embeddings import Embeddings
    from ..core.image_source import ImageSource
    from ..core.models import resolve_model
    from ..core.progress_bar import progress_bar
    from ..model.decoder_checkpoint import DECODER_MODES

    if args.detector is not None and args.mode != "boxes":
        raise UsageError(f"--detector chooses the boxes of --mode boxes, not of --mode {args.mode}")
    if args.points_per_side is not None and args.mode != "auto":
        raise UsageError(f"--points-per-side sets the point grid of --mode auto, not of --mode {args.mode}")
    prompted = [flag for flag, given in (("--point", args.point), ("--bg-point", args.bg_point), ("--box", args.box),
                                         ("--prompts", args.prompts), ("--plane", args.plane)) if given]
    if prompted and not args.add:  # all would be ignored (--add says why it needs --mode prompts itself)
        raise UsageError(f"--mode {args.mode} segments every object of every plane, so {', '.join(prompted)} "
                         "would be ignored: they are for --mode prompts (for one plane of a stack, crop it first "
                         "or use the API's segment_everything(plane))")
    source = ImageSource.open(args.image, axes=args.axes, channel=args.channel)
    _check_labels_into(args, source.plane_grid + source.plane_shape)
    model = resolve_model(args.model, device=args.device, dtype=args.dtype)
    _check_mode(args.mode, model)
    emb = Embeddings(source, model, cache=_cache(args), magnification=args.magnification, diameter=args.diameter)
    if args.mode in DECODER_MODES and args.magnification not in (None, "auto", 1.0) and reads_native_scale(model):
        print(f"note: --mode {args.mode} reads embeddings at magnification 1, where the instance decoder learned; "
              f"--magnification {args.magnification:g} would change nothing", file=sys.stderr)
    settings = _mode_settings(args)
    grid = source.plane_grid
    stacks = [[outer + (i,) for i in range(grid[-1])] for outer in np.ndindex(*grid[:-1])] if grid else [[()]]
    found, offset = [], 0
    with progress_bar(total=source.n_planes, desc=f"segmenting ({args.mode})", unit="plane") as bar:
        for planes in stacks:
            steps = (iter_segment_volume(emb, args.mode, planes, **settings) if grid
                     else iter_segment_plane(emb, 0, args.mode, **settings))
            while True:
                try:
                    report = next(steps)
                except StopIteration as stop:
                    labels = stop.value
                    break
                bar.update(report.stage == "planes")
            found.append(np.where(labels > 0, labels + np.uint32(offset), np.uint32(0)))
            offset += int(labels.max())
        bar.update(source.n_planes - bar.n)
    labels = np.stack(found).reshape(grid + source.plane_shape)
    _write(args, labels, f"{len(np.unique(labels)) - 1} object(s)")
    return 0


def propagate(args) -> int:
    import numpy as np

    from ..api import Annotator
    from ..core.image_source import ImageSource
    from ..core.io import read_image
    from ..core.label_target import check_label_ids
    from ..core.memory_labels import object_planes
    from ..core.outputs import check_folder_writable, check_not_an_input

    _check_out(args)  # before any work
    if args.cache is not None:
        check_not_an_input(args.cache, {"image": args.image, "seeds": args.seeds}, what="--cache")
        check_folder_writable(Path(args.cache).expanduser().parent)
    source = ImageSource.open(args.image, axes=args.axes, channel=args.channel)
    if not source.plane_axes:
        raise UsageError(f"{args.image} is a 2D image: it has no planes to propagate through")
    _check_labels_into(args, source.plane_grid + source.plane_shape)
    seeds = np.asarray(read_image(args.seeds))
    if seeds.dtype.kind not in "biu":
        raise UsageError(f"the seeds {args.seeds} are {seeds.dtype}: a label image has integer (or bool) values")
    if seeds.shape != source.plane_grid + source.plane_shape:  # before the model loads, not after
        raise UsageError(f"the seeds {args.seeds} have shape {seeds.shape}, but the image needs "
                         f"{source.plane_grid + source.plane_shape} (planes, then Y, X)")
    check_label_ids(seeds, f"the seeds {args.seeds}")
    if args.axis is not None and args.axis.upper() not in source.plane_axes:
        raise UsageError(f"--axis {args.axis}: the image's plane axes are {source.plane_axes!r}")
    if not object_planes(seeds, len(source.plane_grid), args.ids):  # absent ids: one line, before the model loads
        raise UsageError(f"the seeds {args.seeds} hold no object to propagate (every pixel is 0)")
    labels = seeds.astype(np.uint32, copy=True)
    ann = Annotator(source, args.model, labels, cache=args.cache, device=args.device, dtype=args.dtype,
                    magnification=args.magnification, diameter=args.diameter)
    if ann.tracking is not None:  # a SAM 2: all objects at once, from every plane they are drawn on
        print(f"propagating with the memory of {ann.tracking.model.config.name} (SAM 2)")
        result = ann.propagate_all(axis=args.axis, ids=args.ids, seeds="drawn")
    else:
        result = ann.propagate_all(axis=args.axis, ids=args.ids)
    for label_id, planes in result.items():
        print(f"object {label_id}: written on {len(planes)} more plane(s)")
    _write(args, ann.labels, f"{len(result)} propagated object(s)")
    return 0
