"""ImageSource: axes, planes, lazy regions and sampled intensity statistics, on real data
written into numpy, dask, Zarr v2, Zarr v3 and OME-Zarr."""

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_sam.core.image_source import ImageSource, guess_axes
from napari_sam.core.preprocess import Normalization


def _ome_zarr(path, data, axes):
    """A two-level OME-Zarr (NGFF 0.4 attributes) holding ``data`` at full resolution."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.create_array("0", data=data, chunks=(1,) * (data.ndim - 2) + (32, 32))
    root.create_array("1", data=data[..., ::2, ::2], chunks=(1,) * (data.ndim - 2) + (32, 32))
    root.attrs["multiscales"] = [
        {"version": "0.4", "axes": [{"name": a.lower()} for a in axes], "datasets": [{"path": "0"}, {"path": "1"}]}
    ]
    return path


@pytest.fixture(params=["numpy", "dask", "zarr_v2", "zarr_v3", "ome_zarr"])
def volume_source(request, nuclei_3d, tmp_path):
    image = nuclei_3d[0][:6]
    kind = request.param
    if kind == "numpy":
        return ImageSource(image, "ZYX"), image
    if kind == "dask":
        return ImageSource(da.from_array(image, chunks=(1, 40, 40)), "ZYX"), image
    if kind == "ome_zarr":
        return ImageSource.open(_ome_zarr(tmp_path / "img.ome.zarr", image, "ZYX")), image
    fmt = 2 if kind == "zarr_v2" else 3
    z = zarr.create_array(str(tmp_path / "img.zarr"), shape=image.shape, dtype=image.dtype, chunks=(1, 32, 32),
                          zarr_format=fmt)
    z[...] = image
    return ImageSource.open(tmp_path / "img.zarr", axes="ZYX"), image


def test_every_array_kind_reads_the_same_planes_and_regions(volume_source):
    src, image = volume_source
    assert src.axes == "ZYX" and src.n_planes == 6 and src.plane_shape == (100, 100)
    assert np.array_equal(src.read(4), image[4])
    assert np.array_equal(src.read(2, region=(10, 47, 33, 90)), image[2, 10:47, 33:90])
    assert np.array_equal(src.read(-1), image[5])


def test_ome_zarr_uses_full_resolution_and_declared_axes(nuclei_3d, tmp_path):
    data = np.stack([nuclei_3d[0][:3], 255 - nuclei_3d[0][:3]])  # (C, Z, Y, X)
    src = ImageSource.open(_ome_zarr(tmp_path / "two.ome.zarr", data, "CZYX"), channel=1)
    assert src.axes == "CZYX" and src.plane_shape == (100, 100) and src.n_planes == 3
    assert np.array_equal(src.read(2), 255 - nuclei_3d[0][2])


def test_time_and_depth_planes_are_numbered_row_major():
    data = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5).astype(np.uint16)
    src = ImageSource(data, "TZYX")
    assert src.plane_axes == "TZ" and src.plane_grid == (2, 3) and src.n_planes == 6
    assert src.plane_index(4) == (1, 1) and src.flat_index((1, 2)) == 5
    assert np.array_equal(src.read((1, 2)), data[1, 2])
    # axes in any order: X before Y is read back as (Y, X)
    src_t = ImageSource(np.swapaxes(data, -1, -2), "TZXY")
    assert np.array_equal(src_t.read((0, 1), region=(1, 3, 0, 4)), data[0, 1, 1:3, 0:4])


def test_rgb_and_channels(nuclei_2d):
    gray = (nuclei_2d[0] // 2).astype(np.uint8)
    rgb = np.stack([gray, gray // 2, 255 - gray], -1)
    src = ImageSource(rgb)
    assert src.axes == "YXC" and src.rgb and src.read(0).shape == (512, 512, 3)
    chans = np.stack([gray, 255 - gray, gray // 3, gray // 4, gray // 5])  # (C, Y, X), 5 channels
    assert np.array_equal(ImageSource(chans, "CYX", channel=3).read(0, (0, 8, 0, 9)), chans[3, :8, :9])
    with pytest.raises(ValueError, match=r"5 channels \(axes 'CYX'\): choose one"):
        ImageSource(chans, "CYX")
    # numpy integers are channels as ints are; other numbers, and ImageSources given other axes, are refused
    assert ImageSource(chans, "CYX", channel=np.int64(3)).channel == 3
    with pytest.raises(ValueError, match="channel must be a whole number"):
        ImageSource(chans, "CYX", channel=True)
    with pytest.raises(ValueError, match="channel=1 given with an ImageSource"):
        ImageSource.of(ImageSource(chans, "CYX", channel=0), channel=1)
    # two trailing channels are channels, not a stack of planes 2 pixels wide
    two = np.stack([gray, 255 - gray], -1)
    assert ImageSource(two, channel=1).axes == "YXC"
    with pytest.raises(ValueError, match="channel 1 given, but the axes 'ZYX', guessed from the shape,"):
        ImageSource(chans[:3], channel=1)
    with pytest.raises(ValueError, match="channel 7 does not exist"):
        ImageSource(chans, "CYX", channel=7)


@pytest.mark.parametrize(
    "shape, axes, message",
    [
        ((4, 5, 6), "YX", "name 2 axes"),
        ((4, 5, 6), "ZYY", "distinct letters"),
        ((4, 5, 6), "ZQX", "distinct letters"),
        ((4, 5, 6), "TZX", "must include Y and X"),
        ((0, 5, 6), "ZYX", "empty"),
    ],
)
def test_bad_axes_are_refused(shape, axes, message):
    with pytest.raises(ValueError, match=message):
        ImageSource(np.zeros(shape, np.uint8), axes)


def test_bad_planes_and_regions_are_refused():
    src = ImageSource(np.zeros((3, 20, 30), np.uint16), "ZYX")
    with pytest.raises(IndexError, match="plane 3 does not exist"):
        src.read(3)
    with pytest.raises(IndexError, match="one entry per plane axis"):
        src.read((0, 1))
    with pytest.raises(ValueError, match="not inside the 20x30 plane"):
        src.read(0, region=(0, 21, 0, 5))
    with pytest.raises(ValueError, match="guess the axes"):
        guess_axes((1, 2, 3, 4, 5, 6))


class CountingArray:
    def __init__(self, data, chunks):
        self.data, self.chunks, self.shape, self.dtype = data, chunks, data.shape, data.dtype
        self.read = 0

    def __getitem__(self, idx):
        out = self.data[idx]
        self.read += np.asarray(out).size
        return out


def test_volume_statistics_come_from_a_sample_of_chunks(nuclei_3d):
    image = np.tile(nuclei_3d[0].astype(np.uint16) * 40, (1, 5, 5))  # (100, 500, 500)
    counting = CountingArray(image, (1, 50, 50))
    src = ImageSource(counting, "ZYX")
    lo, hi = src.intensity_limits()
    assert 0 < counting.read <= 64 * 256 * 256 < image.size / 5  # a sample, not the volume
    full_lo, full_hi = np.percentile(image, [1, 99.8])
    assert abs(lo - full_lo) <= 0.05 * (full_hi - full_lo) and abs(hi - full_hi) <= 0.05 * (full_hi - full_lo)
    # one plane's statistics read only that plane
    plane_lo, plane_hi = ImageSource(image, "ZYX").intensity_limits(plane=50)
    assert (plane_lo, plane_hi) == tuple(np.percentile(image[50], [1, 99.8]))
    assert ImageSource(nuclei_3d[0], "ZYX").intensity_limits() is None  # uint8 passes through
    assert src.intensity_limits(Normalization(mode="fixed", limits=(5, 9))) == (5.0, 9.0)


def test_a_path_is_opened_where_an_image_is_expected_and_named_where_an_array_is(tmp_path, tiny_model):
    import tifffile

    from napari_sam.api import Annotator

    plane = (np.arange(64 * 80) % 251).astype(np.uint8).reshape(64, 80)
    tifffile.imwrite(tmp_path / "plane.tif", plane)
    for given in (tmp_path / "plane.tif", str(tmp_path / "plane.tif")):
        source = ImageSource.of(given)
        assert source.plane_shape == (64, 80) and np.array_equal(source.read(0), plane)
    assert ImageSource.of(source) is source
    ann = Annotator(str(tmp_path / "plane.tif"), tiny_model, cache=False)
    assert ann.labels.shape == (64, 80)
    with pytest.raises(ValueError, match=r"labels hold negative values \(down to -1\)"):
        Annotator(plane, tiny_model, labels=-np.ones((64, 80), np.int16), cache=False)
    with pytest.raises(TypeError, match=r"ImageSource.open\(path\)"):
        ImageSource(str(tmp_path / "plane.tif"))
    with pytest.raises(TypeError, match="an image is an array"):
        ImageSource([[1, 2], [3, 4]])


def test_none_names_the_plane_of_a_2d_image_and_is_refused_for_a_stack():
    assert ImageSource(np.zeros((8, 8))).plane_index(None) == ()
    with pytest.raises(IndexError, match="give the plane: the image has 3 planes along 'Z'"):
        ImageSource(np.zeros((3, 8, 8))).plane_index(None)
