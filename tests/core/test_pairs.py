"""The one reader of image/label pairs (training, evaluation, the command line)."""

import numpy as np
import pytest
import tifffile

from napari_sam.core.pairs import check_pair, pair_files, read_pair


def _write(folder, name, array):
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / name, array)


def test_both_layouts_give_the_same_sorted_pairs(tmp_path):
    for n in ("b.tif", "a.tif"):
        _write(tmp_path / "images", n, np.zeros((4, 5), np.uint8))
        _write(tmp_path / "labels", n, np.zeros((4, 5), np.uint16))
    nested = pair_files(tmp_path)
    apart = pair_files(tmp_path / "images", tmp_path / "labels")
    assert nested == apart and [i.name for i, _ in nested] == ["a.tif", "b.tif"]
    image, labels = read_pair(*nested[0])
    assert image.shape == (4, 5) and labels.dtype == np.uint16


def test_missing_pieces_are_named(tmp_path):
    with pytest.raises(ValueError, match="no folder .*images"):
        pair_files(tmp_path)
    _write(tmp_path / "images", "a.tif", np.zeros((4, 5), np.uint8))
    (tmp_path / "labels").mkdir()
    with pytest.raises(ValueError, match="1 image\\(s\\) .* no label file .*: a.tif"):
        pair_files(tmp_path)
    with pytest.raises(ValueError, match=r"no image files \(TIFF, PNG, JPEG or .npy\) matching"):
        pair_files(tmp_path, pattern="*.png")


def test_check_pair_wants_integer_labels_over_the_same_pixels():
    check_pair(np.zeros((4, 5, 3)), np.zeros((4, 5), np.int32), "rgb")  # a channel axis is fine
    with pytest.raises(ValueError, match="x: labels must be integer"):
        check_pair(np.zeros((4, 5)), np.zeros((4, 5), np.float32), "x")
    with pytest.raises(ValueError, match="do not cover the same pixels"):
        check_pair(np.zeros((4, 5)), np.zeros((5, 4), np.int32), "x")


def test_label_files_without_an_image_are_named_and_a_stack_must_fit_its_image(tmp_path):
    from napari_sam.train import SegmentationDataset

    _write(tmp_path / "images", "a.tif", np.zeros((4, 5), np.uint8))
    _write(tmp_path / "labels", "a.tif", np.ones((4, 5), np.uint16))
    _write(tmp_path / "labels", "b.tif", np.ones((4, 5), np.uint16))  # its image was misnamed
    with pytest.warns(UserWarning, match="1 label file\\(s\\) in .* have no image of the same name .*: b.tif"):
        assert [i.name for i, _ in pair_files(tmp_path)] == ["a.tif"]
    (tmp_path / "labels" / "b.tif").unlink()
    _write(tmp_path / "labels", "a.tif", np.ones((6, 4, 5), np.uint16))  # a 2D image with a label stack
    with pytest.raises(ValueError, match="a.tif: the image \\(4, 5\\) and its label stack \\(6, 4, 5\\) do not cover"):
        SegmentationDataset.from_folder(tmp_path)


def test_previews_of_another_format_beside_the_images_are_named_as_such(tmp_path):
    for d in ("images", "labels"):
        (tmp_path / d).mkdir()
        tifffile.imwrite(tmp_path / d / "a.tif", np.ones((4, 4), np.uint8))
    np.save(tmp_path / "images" / "a_thumb.npy", np.zeros((4, 4)))
    hint = r"a_thumb.npy \(only the .tif files have labels: keep other files out.*--pattern '.\.tif'"
    with pytest.raises(ValueError, match=hint):
        pair_files(tmp_path)
    assert [p.name for p, _ in pair_files(tmp_path, pattern="*.tif")] == ["a.tif"]
