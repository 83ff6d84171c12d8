"""Sample data for napari's File > Open Sample menu: small real images shipped in the package."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).parent / "_data"
NUCLEI_3D_SCALE = (0.284, 0.127, 0.127)  # ZYX voxel size in micrometres


def _read(name: str):
    import tifffile

    return tifffile.imread(DATA_DIR / name)


def nuclei_2d():
    """2D fluorescence nuclei (512x512 uint16, DSB2018 via StarDist, BSD-3-Clause)."""
    return [(_read("nuclei_2d.tif"), {"name": "nuclei 2D", "colormap": "gray"}, "image")]


def nuclei_2d_with_labels():
    """The 2D nuclei and their ground-truth instance labels."""
    return nuclei_2d() + [(_read("nuclei_2d_labels.tif"), {"name": "nuclei 2D ground truth", "opacity": 0.5}, "labels")]


def nuclei_3d():
    """3D nuclei (100x100x100 ZYX uint8, GoNuclear, MIT) with its voxel size in um."""
    meta = {"name": "nuclei 3D", "colormap": "gray", "scale": NUCLEI_3D_SCALE, "units": "um"}
    return [(_read("nuclei_3d.tif"), meta, "image")]


def nuclei_3d_with_labels():
    """The 3D nuclei and their ground-truth instance labels."""
    meta = {"name": "nuclei 3D ground truth", "scale": NUCLEI_3D_SCALE, "units": "um", "opacity": 0.5}
    return nuclei_3d() + [(_read("nuclei_3d_labels.tif"), meta, "labels")]
