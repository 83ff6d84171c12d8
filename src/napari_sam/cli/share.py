"""``napari-sam export`` and ``napari-sam import``: a model as a bioimage.io model package,
and a package back as a checkpoint."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_share_commands", "export_package", "import_package"]


def add_share_commands(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` and ``import`` sub-commands to the command line's sub-parsers."""
    ex = sub.add_parser(
        "export",
        help="write a model as a bioimage.io model package (.zip) that bioimage.io tools can run",
        description="The package holds the weights (a PyTorch state dict under SAM's official names), the "
        "configuration and training provenance (config.napari_sam), a test image with boxes and this model's "
        "masks for them, a README, a cover and the training data's description. Inputs: 'image' (B, 3, S, S) "
        "resized and padded to the model input, 'box' (B, N, 4); outputs: 'masks' (B, N, S, S) logits, 'iou' "
        "(B, N). Nothing is looked up online.",
    )
    ex.add_argument("model", help="registry name (see `napari-sam models`), 'default' (the model shipped with "
                    "the package) or a checkpoint file")
    ex.add_argument("--out", required=True, help="package to write (.zip), in an existing folder")
    ex.add_argument("--name", help="name shown by bioimage.io (letters, digits, spaces, _+-(); 5-128 characters)")
    ex.add_argument("--description", help="one or two sentences on what the model is for")
    ex.add_argument("--author", action="append", default=[], metavar="NAME",
                    help="who made the model; repeatable (default: as recorded in the checkpoint; required "
                    "otherwise, except for the default model)")
    ex.add_argument("--license", help="SPDX identifier, e.g. CC-BY-4.0 (default: as recorded in the checkpoint "
                    "or the registry; BSD-3-Clause for the default model; required otherwise)")
    ex.add_argument("--training-data", metavar="DATASET_ID",
                    help="bioimage.io id of the training data set (default: described from the checkpoint's "
                    "provenance)")
    ex.add_argument("--training-data-license", metavar="SPDX", help="licence of the training data")
    ex.add_argument("--test-image", help="image for the package's test (default: a bundled nuclei sample); its "
                    "boxes are found by Otsu's threshold")
    ex.add_argument("--test", action="store_true",
                    help="then run bioimage.io's model test on the package (the test input through the model, "
                    "compared with the test output; other batch sizes and box counts)")
    ex.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    im = sub.add_parser(
        "import",
        help="turn a bioimage.io model package into a checkpoint that --model loads",
        description="The package is validated with bioimageio.spec (description and file hashes), its weights "
        "are checked against their sha256 and read without unpickling, and must be a SAM state dict in the "
        "official layout; napari-sam's metadata (configuration, training provenance) is restored from "
        "config.napari_sam.",
    )
    im.add_argument("package", help="bioimage.io model package (.zip)")
    im.add_argument("--out", help="checkpoint to write (.pth; default: beside the package, named after it)")
    im.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _require(core: bool = False) -> None:
    from ..train.bioimageio import require_bioimageio
    from . import UsageError

    try:
        require_bioimageio(core=core)
    except ImportError as err:
        raise UsageError(str(err)) from None


def export_package(args) -> int:
    from ..train.bioimageio import export_bioimageio, validate_bioimageio
    from ..weights import REGISTRY

    _require(core=args.test)
    licence = args.license
    if licence is None and args.model in REGISTRY:
        licence = REGISTRY[args.model].licence
    if args.training_data and args.training_data_license:
        raise ValueError("--training-data names a bioimage.io data set, which states its own licence: drop "
                         "--training-data-license")
    data = args.training_data or ({"license": args.training_data_license} if args.training_data_license else None)
    path = export_bioimageio(
        args.model, args.out, name=args.name, description=args.description, authors=args.author or None,
        license=licence, training_data=data, test_image=args.test_image, overwrite=args.overwrite,
    )
    print(f"wrote {path}")
    if args.test:
        passed, lines = validate_bioimageio(path)
        print("\n".join(lines))
        if not passed:
            print(f"napari-sam export: bioimage.io's test of {path} failed (see above)", file=sys.stderr)
            return 1
        print("bioimage.io's test passed")
    return 0


def import_package(args) -> int:
    from ..train.bioimageio_import import import_bioimageio

    _require()
    path = import_bioimageio(args.package, args.out, overwrite=args.overwrite)
    print(f"wrote {path}; use it with --model {path}")
    return 0
