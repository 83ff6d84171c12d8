import numpy as np
import pytest
import tifffile

from napari_sam.core.image_source import ImageSource
from napari_sam.core.io import label_dtype, read_image, write_labels
from napari_sam.core.labels import next_free_id, paint


def test_read_formats(tmp_path):
    import zarr

    img = np.arange(24, dtype=np.uint16).reshape(4, 6)
    tifffile.imwrite(tmp_path / "a.tif", img)
    np.save(tmp_path / "a.npy", img)
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=img.shape, dtype=img.dtype, chunks=(2, 3))
    z[...] = img
    g = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    g.attrs["multiscales"] = [{"datasets": [{"path": "0"}, {"path": "1"}]}]
    g.create_array("0", shape=img.shape, dtype=img.dtype)[...] = img
    g.create_array("1", shape=(2, 3), dtype=img.dtype)
    for name in ("a.tif", "a.npy", "a.zarr", "ome.zarr"):
        np.testing.assert_array_equal(np.asarray(read_image(tmp_path / name)[...]), img, err_msg=name)
    with pytest.raises(ValueError, match="no such image"):
        read_image(tmp_path / "missing.tif")


def test_write_is_atomic_and_refuses_to_overwrite(tmp_path):
    labels = np.array([[0, 1], [2, 2]], np.uint8)
    out = write_labels(tmp_path / "l.tif", labels)
    np.testing.assert_array_equal(tifffile.imread(out), labels)
    with pytest.raises(FileExistsError):
        write_labels(out, labels * 2)
    np.testing.assert_array_equal(tifffile.imread(out), labels)
    write_labels(out, labels * 2, overwrite=True)
    np.testing.assert_array_equal(tifffile.imread(out), labels * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.tif"]  # no temporary left behind


def test_paint_never_overwrites_unless_asked():
    labels = np.zeros((4, 4), np.uint16)
    labels[0, 0] = 5
    mask = np.ones((4, 4), bool)
    assert paint(labels, mask, 6) == 15
    assert labels[0, 0] == 5 and (labels[1:] == 6).all()
    assert paint(labels, mask, 7, overwrite=True) == 16
    assert (labels == 7).all()
    assert next_free_id(labels) == 8
    with pytest.raises(ValueError, match="does not fit"):
        paint(np.zeros((2, 2), np.uint8), np.ones((2, 2), bool), 300)


def test_label_dtype():
    assert label_dtype(255) == np.uint8 and label_dtype(256) == np.uint16 and label_dtype(70000) == np.uint32


def test_write_labels_replaces_only_what_it_wrote(tmp_path):
    import zarr

    from napari_sam.core.outputs import check_output

    labels = np.ones((4, 4), np.uint8)
    ours = write_labels(tmp_path / "ours.zarr", labels)
    assert zarr.open_array(str(ours), mode="r").attrs["napari_sam"] == {"kind": "labels"}
    write_labels(ours, labels * 3, overwrite=True)  # ours: replaced
    assert (np.asarray(zarr.open_array(str(ours), mode="r")) == 3).all()
    image = zarr.create_array(str(tmp_path / "image.zarr"), shape=(4, 4), dtype="uint8")
    image[...] = 5
    with pytest.raises(ValueError, match="not a label array written by napari-sam"):
        write_labels(tmp_path / "image.zarr", labels, overwrite=True)
    assert (np.asarray(image) == 5).all()
    with pytest.raises(ValueError, match="is the image"):
        check_output(tmp_path / "image.zarr", {"image": tmp_path / "image.zarr"}, overwrite=True)
    with pytest.raises(ValueError, match="lies inside the image"):
        check_output(tmp_path / "image.zarr" / "l.tif", {"image": tmp_path / "image.zarr"})
    with pytest.raises(ValueError, match="contains the image"):
        check_output(tmp_path / "x.zarr", {"image": tmp_path / "x.zarr" / "0"})


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"not a tiff at all")
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "empty.zarr").mkdir()
    for name, message in [("a.tif", "as a TIFF image"), ("a.txt", "use TIFF, Zarr"), ("empty.zarr", "as Zarr")]:
        with pytest.raises(ValueError, match=f"cannot read {tmp_path / name}.*{message}"):
            read_image(tmp_path / name)


def test_a_failed_final_rename_puts_the_old_zarr_labels_back(tmp_path, monkeypatch):
    import os

    import zarr

    from napari_sam.core import io

    target = tmp_path / "labels.zarr"
    io.write_labels(target, np.full((4, 5), 3, np.uint16))
    real = os.replace
    calls = []

    def failing(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new store into place
            raise OSError("disk vanished")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", failing)
    with pytest.raises(OSError, match="disk vanished"):
        io.write_labels(target, np.ones((4, 5), np.uint16), overwrite=True)
    monkeypatch.undo()
    assert (np.asarray(zarr.open_array(str(target), mode="r")) == 3).all()
    assert [p.name for p in tmp_path.iterdir()] == ["labels.zarr"]  # no staging folder left


def test_upper_case_suffixes_and_linked_stores(tmp_path):
    out = write_labels(tmp_path / "labels.NPY", np.ones((3, 4), np.uint16))
    assert out.name == "labels.NPY" and np.load(out).sum() == 12
    assert [p.name for p in tmp_path.iterdir()] == ["labels.NPY"]
    real = write_labels(tmp_path / "real.zarr", np.ones((3, 4), np.uint16))
    (tmp_path / "link.zarr").symlink_to(real)
    with pytest.raises(ValueError, match="symbolic link"):
        write_labels(tmp_path / "link.zarr", np.zeros((3, 4), np.uint16), overwrite=True)
    assert np.load(out).sum() == 12 and real.is_dir()


def test_a_label_store_of_a_session_can_be_replaced_with_overwrite(tmp_path):
    import zarr

    from napari_sam.core.label_target import create_label_store
    from napari_sam.core.labels import LabelWriter
    from napari_sam.core.masks import PlaneMask

    store = tmp_path / "session.zarr"
    writer = LabelWriter(create_label_store(store, (2, 6, 6)))
    writer.commit((0,), [PlaneMask.from_full(np.ones((6, 6), bool))])
    write_labels(store, np.full((2, 6, 6), 7, np.uint16), overwrite=True)
    assert (np.asarray(zarr.open_array(str(store), mode="r")) == 7).all()



def test_a_label_store_that_cannot_be_removed_is_refused_before_the_work(tmp_path, monkeypatch):
    import os

    from napari_sam.core import outputs
    from napari_sam.core.label_target import create_label_store

    store = tmp_path / "old.zarr"
    create_label_store(store, (2, 6, 6))
    locked = str(store / "c")
    os.makedirs(locked, exist_ok=True)
    real = os.access
    # chmod -R a-w as another user (root passes every permission check, so the test pretends)
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: real(p, mode) and os.fspath(p) != locked)
    with pytest.raises(PermissionError, match="--overwrite cannot replace it") as err:
        outputs.check_output(store, overwrite=True)
    assert err.value.filename == locked
    monkeypatch.setattr(outputs.os, "access", real)
    assert outputs.check_output(store, overwrite=True) == store


@pytest.mark.parametrize("ome, said", [
    ({"multiscales": [{"datasets": [{"path": "s9"}]}]}, "name the level 's9', which cannot be read"),
    ({"multiscales": [{"datasets": []}]}, "name no level"),
    ({"multiscales": [{}]}, "name no level"),
    ({"multiscales": {"datasets": [{"path": "s0"}]}}, "is not a list of images"),
    ({"multiscales": [{"datasets": [{"path": 5}]}]}, "name no level"),
    ("garbage", "'ome' metadata is a str"),
    ({"multiscales": [{"datasets": [{"path": "s0"}], "axes": [{"name": ""}, {"name": "x"}]}]}, "not all named"),
])
def test_malformed_ome_zarr_metadata_is_one_line_naming_the_image(tmp_path, ome, said):
    import zarr

    from napari_sam.core.image_source import ImageSource

    path = tmp_path / "bad.ome.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.create_array("s0", shape=(8, 8), dtype="uint8")
    group.attrs["ome"] = ome
    with pytest.raises(ValueError, match=said) as info:
        ImageSource.open(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_rgb_stored_plane_by_plane_keeps_its_planes_and_names_the_choice(tmp_path):
    # tifffile declares every 3-plane uint8 stack so: the planes stay planes, and the
    # warning says how to read them as colour
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    with pytest.warns(UserWarning, match="declares RGB stored plane by plane; its axes are read as ZYX"):
        assert ImageSource.open(path).plane_grid == (3,)
    colour = ImageSource.open(path, axes="CYX")
    assert colour.plane_axes == "" and colour.plane_shape == (40, 50)


def test_a_grey_stack_of_three_planes_is_read_without_a_word(tmp_path):
    import warnings

    stack = np.random.default_rng(0).integers(0, 255, (3, 40, 50), dtype=np.uint8)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ImageSource.open(path).plane_grid == (3,)
    np.testing.assert_array_equal(read_image(path), stack)


def test_an_imagej_hyperstack_and_an_ome_tiff_say_their_axes(tmp_path):
    from napari_sam.core.io import image_axes

    data = np.zeros((3, 2, 40, 50), np.uint16)  # Z, C, Y, X
    tifffile.imwrite(tmp_path / "fiji.tif", data, imagej=True, metadata={"axes": "ZCYX"})
    tifffile.imwrite(tmp_path / "ome.tif", np.moveaxis(data, 1, 0), ome=True, metadata={"axes": "CZYX"})
    tifffile.imwrite(tmp_path / "plain.tif", data[:, 0], photometric="minisblack")
    assert image_axes(tmp_path / "fiji.tif") == "ZCYX"
    assert image_axes(tmp_path / "ome.tif") == "CZYX"
    assert image_axes(tmp_path / "plain.tif") is None
    # tifffile, told nothing, declares a plain stack's planes channels: not believed
    tifffile.imwrite(tmp_path / "stack.ome.tif", data[:, 0])
    assert image_axes(tmp_path / "stack.ome.tif") is None
    src = ImageSource.open(tmp_path / "fiji.tif", channel=1)
    assert src.plane_axes == "Z" and src.plane_grid == (3,)


def test_an_imagej_stack_cut_short_is_refused_not_read_as_one_plane(tmp_path, capsys):
    # an interrupted copy: tifffile finds the first plane and reads it as the whole image
    volume = np.random.default_rng(0).integers(0, 255, (20, 64, 64), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "full.tif", volume, imagej=True, metadata={"axes": "ZYX"})
    (tmp_path / "cut.tif").write_bytes((tmp_path / "full.tif").read_bytes()[:20000])
    assert read_image(tmp_path / "full.tif").shape == (20, 64, 64)
    with pytest.raises(ValueError, match=r"cut short or damaged: its ImageJ header announces 20 planes, the file "
                                         r"holds 1"):
        read_image(tmp_path / "cut.tif")
    assert capsys.readouterr().err == ""  # said once, by us, not by tifffile's log as well



def test_a_plain_or_ome_tiff_stack_cut_short_is_refused(tmp_path):
    import tifffile

    volume = np.random.default_rng(1).integers(0, 255, (5, 64, 64), dtype=np.uint8)
    for name, options in (("z.tif", {"compression": "zlib"}), ("z.ome.tif", {}), ("p.tif", {})):
        tifffile.imwrite(tmp_path / name, volume, **options)
        assert read_image(tmp_path / name).shape == (5, 64, 64)
        whole = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(whole[:int(len(whole) * 0.6)])
        with pytest.raises(ValueError):
            read_image(tmp_path / f"cut_{name}")
