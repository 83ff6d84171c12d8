"""NGFF label images inside OME-Zarr images: written with their image's pyramid and metadata,
read back by ome-zarr-py (the reader napari-ome-zarr uses), kept current by every commit,
undo and recovery, without touching the image or any chunk a change does not reach."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_sam.core.label_pyramid import affected_range, downsample, level_factors, source_indices, update_levels
from napari_sam.core.labels import LabelWriter
from napari_sam.core.masks import PlaneMask
from napari_sam.core.ngff import (
    LabelImage,
    check_label_target,
    is_ome_zarr,
    ngff_version,
    open_label_image,
    write_label_image,
)

JOURNAL = ".napari_sam_pending.npz"
KINDS = {
    # axes, shape, scale factors per level, physical scale
    "yx": ("yx", (50, 70), [2, 4], {"y": 0.25, "x": 0.25}),
    "zyx": ("zyx", (4, 48, 64), [2, 4], {"z": 2.0, "y": 0.5, "x": 0.5}),  # Z not downsampled
    "czyx": ("czyx", (2, 3, 40, 40), [2], {"c": 1.0, "z": 1.0, "y": 1.0, "x": 1.0}),
    "zyx-z-down": ("zyx", (8, 32, 32), [{"z": 2, "y": 2, "x": 2}, {"z": 4, "y": 4, "x": 4}],
                   {"z": 1.0, "y": 1.0, "x": 1.0}),
}


def make_image(folder: Path, version: str, kind: str) -> Path:
    """An OME-Zarr image written by ome-zarr-py, in NGFF ``version``, chunked 16 x 16 per plane."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    axes, shape, factors, scale = KINDS[kind]
    path = folder / f"{kind}-{version}.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    data = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    write_image(data, group, axes=axes, fmt=fmt, scale_factors=factors, scale=scale,
                storage_options={"chunks": (1,) * (len(shape) - 2) + (16, 16)})
    return path


def image_files(path: Path) -> dict:
    """Every file of the image outside labels/, with its bytes."""
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*")
            if p.is_file() and "labels" not in p.relative_to(path).parts}


def read_back(path: Path):
    """ome-zarr-py's view of the container: (image node, {label name: node})."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(path)))())
    image = next(n for n in nodes if "image-label" not in n.zarr.root_attrs and "multiscales" in n.zarr.root_attrs)
    labels = {n.zarr.basename(): n for n in nodes if "image-label" in n.zarr.root_attrs}
    return image, labels


def consistent(label: LabelImage) -> None:
    """Every lower level is what rebuilding it from level 0 gives."""
    level0 = np.asarray(label.levels[0][...])
    for level, f in zip(label.levels[1:], label.factors[1:]):
        np.testing.assert_array_equal(np.asarray(level[...]), downsample(level0, level.shape, f))


@pytest.fixture
def written(monkeypatch):
    """The files Zarr writes or deletes from now on (a rewrite with equal bytes counts too)."""
    import zarr.storage._local as local

    paths: list[Path] = []
    put, delete = local._put, local.LocalStore.delete

    def _put(path, value, exclusive=False):
        paths.append(Path(path))
        return put(path, value, exclusive)

    async def _delete(self, key):
        paths.append(Path(self.root) / key)
        return await delete(self, key)

    monkeypatch.setattr(local, "_put", _put)
    monkeypatch.setattr(local.LocalStore, "delete", _delete)
    return paths


def lower_chunks(label: LabelImage, paths) -> set:
    """The lower-level chunks among ``paths``: {(level, chunk index)}; other files are ignored."""
    out = set()
    for k in range(1, len(label.levels)):
        folder = label.path / str(label.levels[k].store_path.path)
        for p in paths:
            if p.is_relative_to(folder) and not p.name.startswith((".", "zarr.json")):
                parts = p.relative_to(folder).parts
                out.add((k, tuple(int(i) for i in (parts[1:] if parts[0] == "c" else parts))))
    return out


def reached_chunks(label: LabelImage, plane, region) -> set:
    """The lower-level chunks holding pixels whose source lies in the region."""
    out = set()
    shape0 = label.levels[0].shape
    y0, y1, x0, x1 = region
    for k in range(1, len(label.levels)):
        level, f = label.levels[k], label.factors[k]
        spans = [affected_range(p, p + 1, shape0[a], level.shape[a], f[a]) for a, p in enumerate(plane)]
        spans += [affected_range(y0, y1, shape0[-2], level.shape[-2], f[-2]),
                  affected_range(x0, x1, shape0[-1], level.shape[-1], f[-1])]
        if any(a >= b for a, b in spans):
            continue
        ranges = [range(a // c, (b - 1) // c + 1) for (a, b), c in zip(spans, level.chunks)]
        out |= {(k, idx) for idx in np.ndindex(*[len(r) for r in ranges])
                for idx in [tuple(r[i] for r, i in zip(ranges, idx))]}
    return out


def obj(y0, y1, x0, x1):
    return PlaneMask((y0, y1, x0, x1), np.ones((y1 - y0, x1 - x0), bool), 0.9, ())


# -- the sampling rule -------------------------------------------------------------------
def test_each_lower_pixel_takes_the_level0_pixel_under_its_centre():
    np.testing.assert_array_equal(source_indices(8, 4, 2.0), [1, 3, 5, 7])
    np.testing.assert_array_equal(source_indices(9, 5, 2.0), [1, 3, 5, 7, 8])  # the last one clipped
    np.testing.assert_array_equal(source_indices(7, 2, 3.5), [1, 5])
    assert level_factors([(9, 10), (9, 5)], [(2.0, 0.1), (2.0, 0.2)]) == [(1.0, 1.0), (1.0, 2.0)]
    # no scale: the shape ratio; a ratio of decimals is not off by one ulp
    assert level_factors([(9, 12), (3, 4)], [None, None])[1] == (3.0, 3.0)
    assert level_factors([(9,), (3,)], [(0.1,), (0.3,)])[1] == (3.0,)
    assert affected_range(4, 6, 8, 4, 2.0) == (2, 3) and affected_range(4, 5, 8, 4, 2.0) == (2, 2)


@pytest.mark.parametrize("factors", [(1.0, 2.0, 2.0), (2.0, 3.0, 2.5), (4.0, 8.571428571, 1.0)])
def test_updating_any_region_gives_what_a_rebuild_gives(factors):
    rng = np.random.default_rng(1)
    level0 = np.zeros((9, 61, 47), np.uint16)
    levels = [level0] + [np.zeros(tuple(max(1, int(np.ceil(n / (f * k)))) for n, f in zip(level0.shape, factors)),
                                  np.uint16) for k in (1, 2)]
    f = [(1.0, 1.0, 1.0)] + [tuple(a * k for a in factors) for k in (1, 2)]
    for step in range(40):
        z = int(rng.integers(9))
        y0, x0 = int(rng.integers(61)), int(rng.integers(47))
        y1, x1 = int(rng.integers(y0 + 1, 62)), int(rng.integers(x0 + 1, 48))
        level0[z, y0:y1, x0:x1] = step + 1
        update_levels(levels, f, (z,), (y0, y1, x0, x1))
        for level, fk in zip(levels[1:], f[1:]):
            np.testing.assert_array_equal(level, downsample(level0, level.shape, fk))
    assert len(np.unique(levels[2])) > 3  # ids kept, never blended


# -- a new label image -------------------------------------------------------------------
@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("kind", ["yx", "zyx", "czyx"])
def test_a_new_label_image_mirrors_the_image_and_reads_back_with_ome_zarr(tmp_path, version, kind):
    path = make_image(tmp_path, version, kind)
    before = image_files(path)
    assert is_ome_zarr(path) and ngff_version(path) == version
    label = open_label_image(path, "cells", chunks=(16, 16))
    assert label.path == path / "labels" / "cells" and label.axes == KINDS[kind][0].replace("c", "").upper()
    image, labels = read_back(path)
    node = labels["cells"]
    no_c = (lambda v: v[1:]) if kind == "czyx" else (lambda v: v)
    assert [d.shape for d in node.data] == [no_c(d.shape) for d in image.data]
    assert [a["name"] for a in node.metadata["axes"]] == [a["name"] for a in no_c(image.metadata["axes"])]
    for mine, theirs in zip(node.metadata["coordinateTransformations"], image.metadata["coordinateTransformations"]):
        assert mine[0]["scale"] == no_c(theirs[0]["scale"])
        assert mine[1]["translation"] == no_c(theirs[1]["translation"])
    assert [tuple(s) for s in label.scales] == [tuple(no_c(t[0]["scale"]))
                                                for t in image.metadata["coordinateTransformations"]]
    meta = node.zarr.root_attrs["image-label"]
    assert meta["source"] == {"image": "../../"} and meta["version"] == version
    assert node.metadata["name"] == "cells"
    group = zarr.open_group(str(path / "labels"), mode="r")
    assert (dict(group.attrs).get("ome", dict(group.attrs)))["labels"] == ["cells"]
    for level in label.levels:
        assert level.metadata.zarr_format == (2 if version == "0.4" else 3)
        assert level.chunks == (1,) * (level.ndim - 2) + tuple(min(16, n) for n in level.shape[-2:])
        assert level.dtype == np.uint32 and not np.asarray(level[...]).any()
    assert dict(label.data.attrs) == {"napari_sam": {"kind": "labels"}, "napari_sam_max_id": 0}
    assert image_files(path) == before
    assert [p.name for p in (path / "labels").iterdir() if p.name.startswith(".napari-sam")] == []


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_commits_and_undos_keep_the_levels_current_in_the_touched_chunks_only(tmp_path, version, written):
    path = make_image(tmp_path, version, "zyx")
    before = image_files(path)
    label = open_label_image(path, "cells", chunks=(8, 8))
    writer = LabelWriter(label.data, on_write=label.update)
    writer.commit((1,), [obj(2, 12, 3, 9)])
    consistent(label)
    for plane, region in [((2,), (20, 30, 40, 60)), ((2,), (0, 48, 0, 2)), ((3,), (47, 48, 63, 64))]:
        written.clear()
        commit = writer.commit(plane, [obj(*region)])
        assert commit.pixels[0] == (region[1] - region[0]) * (region[3] - region[2])
        assert lower_chunks(label, written) == reached_chunks(label, plane, region)
        consistent(label)
    written.clear()
    writer.undo()
    consistent(label)
    assert not np.asarray(label.data[3]).any() and not np.asarray(label.levels[2][3]).any()
    assert lower_chunks(label, written) == reached_chunks(label, (3,), (47, 48, 63, 64))
    # reopened to continue: the same arrays, the largest id from the attributes (an undo frees no id)
    again = open_label_image(path, "cells")
    assert LabelWriter(again.data, on_write=again.update).next_id() == 5
    np.testing.assert_array_equal(np.asarray(again.levels[1][...]), np.asarray(label.levels[1][...]))
    assert image_files(path) == before


def test_a_plane_write_reaches_the_lower_planes_it_is_the_source_of(tmp_path):
    path = make_image(tmp_path, "0.5", "zyx-z-down")
    label = open_label_image(path, "cells", chunks=(8, 8))
    assert [tuple(level.shape) for level in label.levels] == [(8, 32, 32), (4, 16, 16), (2, 8, 8)]
    writer = LabelWriter(label.data, on_write=label.update)
    # level 1 samples planes 1, 3, 5, 7 (floor((j + .5) 2)), level 2 planes 2, 6 (floor((j + .5) 4))
    writer.commit((4,), [obj(0, 32, 0, 32)])
    assert not np.asarray(label.levels[1][...]).any() and not np.asarray(label.levels[2][...]).any()
    writer.commit((5,), [obj(4, 20, 4, 20)])
    assert np.asarray(label.levels[1][2])[2:10, 2:10].min() == 2 and not np.asarray(label.levels[2][...]).any()
    writer.commit((6,), [obj(0, 8, 0, 8)])
    assert np.asarray(label.levels[2][1])[:2, :2].min() == 3
    assert not np.asarray(label.levels[1][[0, 1, 3]]).any() and not np.asarray(label.levels[2][0]).any()
    consistent(label)


def test_the_annotator_commits_into_a_label_image_and_refuses_one_of_another_shape(tmp_path, tiny_model):
    from napari_sam.api import Annotator

    path = make_image(tmp_path, "0.4", "zyx")
    label = open_label_image(path, "cells", chunks=(16, 16))
    image = zarr.open_group(str(path), mode="r")["s0"]
    ann = Annotator(image, tiny_model, labels=label, axes="ZYX", cache=False)
    assert ann.label_image is label and ann.labels is label.data
    assert ann.commit(1, [obj(10, 40, 10, 50)]).ids == (1,)
    consistent(label)
    assert np.asarray(label.levels[2][1]).max() == 1
    ann.undo()
    assert not np.asarray(label.levels[1][...]).any()
    other = open_label_image(make_image(tmp_path, "0.4", "yx"), "cells")
    with pytest.raises(ValueError, match=r"the label image .*yx-0.4.ome.zarr/labels/cells has shape \(50, 70\)"):
        Annotator(image, tiny_model, labels=other, axes="ZYX", cache=False)


# -- failures and kills ------------------------------------------------------------------
def test_a_failed_pyramid_update_is_rolled_back_on_every_level(tmp_path, monkeypatch):
    import zarr.storage._local as local

    path = make_image(tmp_path, "0.5", "zyx")
    label = open_label_image(path, "cells", chunks=(8, 8))
    writer = LabelWriter(label.data, on_write=label.update)
    writer.commit((2,), [obj(0, 16, 0, 16)])
    snapshot = [np.asarray(level[...]) for level in label.levels]
    note = label.path / "s0" / JOURNAL
    original, failures = local._put, []

    def failing(p, value, exclusive=False):  # writes into level 1 fail: the disk is full there
        if "/s1/c/" in str(p).replace("\\", "/") and len(failures) < budget:
            failures.append(p)
            raise OSError(28, "No space left on device")
        return original(p, value, exclusive)

    monkeypatch.setattr(local, "_put", failing)
    budget = 1  # one failure: the roll-back refreshes level 1 and the note goes
    with pytest.raises(OSError, match="No space left"):
        writer.commit((2,), [obj(4, 40, 4, 40)])
    assert not note.exists() and writer.next_id() == 2
    for level, before in zip(label.levels, snapshot):
        np.testing.assert_array_equal(np.asarray(level[...]), before)
    budget = 100  # the roll-back cannot refresh level 1 either: the note stays for the next opening
    with pytest.raises(OSError, match="No space left"):
        writer.commit((2,), [obj(4, 40, 4, 40)])
    assert note.exists()
    np.testing.assert_array_equal(np.asarray(label.data[...]), snapshot[0])
    monkeypatch.setattr(local, "_put", original)
    again = open_label_image(path, "cells")
    reopened = LabelWriter(again.data, on_write=again.update)
    assert reopened.recovered and not note.exists()
    for level, before in zip(again.levels, snapshot):
        np.testing.assert_array_equal(np.asarray(level[...]), before)
    assert reopened.commit((2,), [obj(10, 40, 10, 40)]).ids == (2,)
    consistent(again)


_KILLED = r"""
import os, signal, sys
import numpy as np
import zarr.storage._local as local
from napari_sam.core.labels import LabelWriter
from napari_sam.core.masks import PlaneMask
from napari_sam.core.ngff import open_label_image

label = open_label_image(sys.argv[1], "cells")
writer = LabelWriter(label.data, on_write=label.update)
original, seen = local._put, []

def _put(path, value, exclusive=False):
    if "/s2/" in str(path).replace(os.sep, "/"):  # level 0 and 1 written, level 2 not yet
        os.kill(os.getpid(), signal.SIGKILL)
    return original(path, value, exclusive)

local._put = _put
writer.commit((1,), [PlaneMask((5, 45, 5, 60), np.ones((40, 55), bool), 0.9, ())])
"""


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_a_commit_killed_during_the_pyramid_update_is_undone_on_every_level_when_reopened(tmp_path, version):
    path = make_image(tmp_path, version, "zyx")
    label = open_label_image(path, "cells", chunks=(16, 16))
    LabelWriter(label.data, on_write=label.update).commit((1,), [obj(0, 4, 0, 4)])
    before = [np.asarray(level[...]) for level in label.levels]
    done = subprocess.run([sys.executable, "-c", _KILLED, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    level0 = label.path / str(label.data.store_path.path)
    assert (level0 / JOURNAL).exists()
    assert np.asarray(label.data[1]).max() == 2  # killed with level 0 written, level 2 behind
    again = open_label_image(path, "cells")
    writer = LabelWriter(again.data, on_write=again.update)
    assert writer.recovered and not (level0 / JOURNAL).exists()
    for level, old in zip(again.levels, before):
        np.testing.assert_array_equal(np.asarray(level[...]), old)
    assert writer.next_id() == 2


# -- whole label images, replacing, refusing ---------------------------------------------
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_write_label_image_writes_the_pyramid_and_replaces_only_when_asked(tmp_path, version):
    path = make_image(tmp_path, version, "czyx")
    before = image_files(path)
    labels = np.zeros((3, 40, 40), np.uint16)
    labels[1, 5:30, 8:20] = 3
    labels[2, 30:40, 0:40] = 9
    written = write_label_image(path, "nuclei", labels, colors={3: (255, 0, 0, 255)},
                                properties={3: {"class": "nucleus"}})
    consistent(written)
    np.testing.assert_array_equal(np.asarray(written.data[...]), labels)
    assert written.data.dtype == np.uint32 and written.data.attrs["napari_sam_max_id"] == 9
    _, nodes = read_back(path)
    assert nodes["nuclei"].metadata["color"] == {3: [1.0, 0.0, 0.0, 1.0]}
    assert nodes["nuclei"].metadata["properties"] == {3: {"class": "nucleus"}}
    listing = sorted(p.relative_to(path) for p in path.rglob("*"))
    with pytest.raises(FileExistsError, match=r"labels/nuclei exists; pass --overwrite"):
        write_label_image(path, "nuclei", np.zeros_like(labels))
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == listing
    plane = np.zeros((40, 40), np.uint8)
    plane[:4, :4] = 1
    replaced = write_label_image(path, "nuclei", plane, plane=(2,), overwrite=True)
    assert int(np.asarray(replaced.data[...]).sum()) == 16 and replaced.data[2, 0, 0] == 1
    consistent(replaced)
    emptied = open_label_image(path, "nuclei", overwrite=True)
    assert not np.asarray(emptied.data[...]).any()
    group = zarr.open_group(str(path / "labels"), mode="r")
    assert (dict(group.attrs).get("ome", dict(group.attrs)))["labels"] == ["nuclei"]
    assert image_files(path) == before


def test_refusals_name_the_fault_and_write_nothing(tmp_path, monkeypatch):
    import napari_sam.core.outputs as outputs

    path = make_image(tmp_path, "0.5", "zyx")
    write_label_image(path, "cells", np.ones((4, 48, 64), np.uint8))
    plain = zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 4), dtype="uint8")
    zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    (tmp_path / "img.tif").write_bytes(b"II*\0")
    listing = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*"))
    cases = [
        (lambda: write_label_image(path, "cells", np.zeros((4, 48, 64), np.uint8)), FileExistsError,
         r"labels/cells exists; pass --overwrite \(overwrite=True\)"),
        (lambda: write_label_image(path, "new", np.zeros((4, 48, 63), np.uint8)), ValueError,
         r"labels of shape \(4, 48, 63\) do not fit the OME-Zarr image .* shape \(4, 48, 64\) \(axes ZYX\)"),
        (lambda: write_label_image(path, "new", np.zeros((48, 64), np.uint8), plane=(4,)), ValueError,
         r"plane at \(4,\) does not fit"),
        (lambda: write_label_image(path, "new", -np.ones((4, 48, 64), np.int8)), ValueError, "non-negative"),
        (lambda: open_label_image(path, "a/b"), ValueError, r"label image name 'a/b'"),
        (lambda: open_label_image(path, ".hidden"), ValueError, r"label image name '.hidden'"),
        (lambda: open_label_image(path, ""), ValueError, r"label image name ''"),
        (lambda: open_label_image(path, "missing", create=False), FileNotFoundError, r"no label image 'missing'"),
        (lambda: open_label_image(plain.store_path.store.root, "x"), ValueError, "plain.zarr is not an OME-Zarr image"),
        (lambda: open_label_image(tmp_path / "group.zarr", "x"), ValueError, "no multiscales metadata"),
        (lambda: open_label_image(tmp_path / "img.tif", "x"), ValueError, "img.tif is not an OME-Zarr image: a file"),
        (lambda: open_label_image(tmp_path / "nothing.zarr", "x"), ValueError, "no such folder"),
        (lambda: open_label_image(path / "labels" / "cells", "x"), ValueError, "is a label image, not an image"),
        (lambda: check_label_target(path, "cells", shape=(4, 48, 64)), FileExistsError, "--overwrite"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*")) == listing
    assert not is_ome_zarr(tmp_path / "group.zarr") and not is_ome_zarr(tmp_path / "img.tif")
    assert not is_ome_zarr(path / "labels" / "cells") and not is_ome_zarr(tmp_path / "plain.zarr")
    # an existing label image of another shape or kind is named, never reopened silently
    meta = path / "labels" / "cells" / "s0" / "zarr.json"
    meta.write_text(meta.read_text().replace('"uint32"', '"float32"'))
    with pytest.raises(ValueError, match=r"labels/cells holds float32 labels .* not integer labels of shape"):
        open_label_image(path, "cells")
    fields = json.loads(meta.read_text().replace('"float32"', '"uint32"'))
    meta.write_text(json.dumps({**fields, "shape": [4, 48, 60]}))
    with pytest.raises(ValueError, match=r"of shape \(4, 48, 60\), not integer labels of shape \(4, 48, 64\)"):
        open_label_image(path, "cells")
    (path / "labels" / "notes").write_text("mine")
    with pytest.raises(ValueError, match="notes is not a label image .* never deletes it"):
        write_label_image(path, "notes", np.zeros((4, 48, 64), np.uint8), overwrite=True)
    assert (path / "labels" / "notes").read_text() == "mine"
    # a read-only container: refused before anything is made
    def refuse(*args, **kwargs):
        raise PermissionError(13, "denied")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match="cannot write in the folder .*labels"):
        write_label_image(path, "new", np.zeros((4, 48, 64), np.uint8))
    assert not (path / "labels" / "new").exists()


def test_an_interrupted_create_leaves_nothing_under_the_name_and_leftovers_are_cleaned(tmp_path, monkeypatch):
    import napari_sam.core.ngff as ngff
    from napari_sam.core.staging import PREFIX, _host_tag

    path = make_image(tmp_path, "0.4", "zyx")
    write_label_image(path, "cells", np.full((4, 48, 64), 2, np.uint8))

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ngff, "downsample", broken)  # interrupted while building the lower levels
    with pytest.raises(KeyboardInterrupt):
        write_label_image(path, "fresh", np.ones((4, 48, 64), np.uint8))
    with pytest.raises(KeyboardInterrupt):
        write_label_image(path, "cells", np.ones((4, 48, 64), np.uint8), overwrite=True)
    monkeypatch.undo()
    assert not (path / "labels" / "fresh").exists()
    assert np.asarray(open_label_image(path, "cells").data[...]).min() == 2  # the old one, whole
    assert [p.name for p in (path / "labels").iterdir() if p.name.startswith(PREFIX)] == []
    # leftovers of a dead writer: one cut between its two renames still holds the old label image
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    os.replace(path / "labels" / "cells", tmp_path / "cells-old")
    cut = path / "labels" / f"{PREFIX}.{_host_tag()}.{pid}.-1.abcd"
    cut.mkdir()
    os.replace(tmp_path / "cells-old", cut / ".old.cells")
    stale = path / "labels" / f"{PREFIX}.{_host_tag()}.{pid}.-1.efgh"
    (stale / "half").mkdir(parents=True)
    alive = path / "labels" / f"{PREFIX}.{_host_tag()}.{os.getppid()}.-1.ijkl"  # a live writer's: kept
    alive.mkdir()
    write_label_image(path, "other", np.zeros((4, 48, 64), np.uint8))
    assert not cut.exists() and not stale.exists() and alive.exists()
    assert np.asarray(open_label_image(path, "cells").data[...]).min() == 2  # put back
    _, nodes = read_back(path)
    assert sorted(nodes) == ["cells", "other"]


def _cut_between_renames(path: Path, name: str) -> Path:
    """Leave ``labels/<name>`` as a writer killed between the two renames of its replacement
    leaves it: moved aside into that dead writer's staging folder, the name empty."""
    from napari_sam.core.staging import PREFIX, _host_tag

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cut = path / "labels" / f"{PREFIX}.{_host_tag()}.{int(dead.stdout)}.-1.cut"
    cut.mkdir()
    os.replace(path / "labels" / name, cut / f".old.{name}")
    return cut


def test_a_label_image_cut_off_mid_replacement_is_put_back_and_never_replaced_unasked(tmp_path):
    from napari_sam.core.staging import make_staging, swap_in

    path = make_image(tmp_path, "0.5", "zyx")
    write_label_image(path, "cells", np.full((4, 48, 64), 2, np.uint8))
    # reopened to continue: the old label image, not a new empty one in its place
    cut = _cut_between_renames(path, "cells")
    label = open_label_image(path, "cells")
    assert not cut.exists() and np.asarray(label.data[...]).min() == 2
    # a whole write without overwrite: refused, as if the writer had never been cut off
    _cut_between_renames(path, "cells")
    with pytest.raises(FileExistsError, match=r"labels/cells exists; pass --overwrite"):
        write_label_image(path, "cells", np.zeros((4, 48, 64), np.uint8))
    assert np.asarray(open_label_image(path, "cells").data[...]).min() == 2
    # a name taken after the caller looked is not replaced either
    staging = make_staging(path / "labels")
    (staging / "cells").mkdir()
    with pytest.raises(FileExistsError, match="appeared while napari-sam was writing it"):
        swap_in(staging, "cells")
    assert (staging / "cells").is_dir() and np.asarray(open_label_image(path, "cells").data[...]).min() == 2


def test_replacing_a_label_image_that_cannot_be_moved_is_refused_before_any_work(tmp_path, monkeypatch):
    import napari_sam.core.outputs as outputs

    path = make_image(tmp_path, "0.4", "zyx")
    write_label_image(path, "cells", np.full((4, 48, 64), 2, np.uint8))
    target = path / "labels" / "cells"
    make = outputs.tempfile.mkstemp

    def read_only_label_image(*args, dir=None, **kwargs):  # the label image's folder is read-only
        if Path(dir) == target:
            raise PermissionError(13, "Permission denied")
        return make(*args, dir=dir, **kwargs)

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only_label_image)
    with pytest.raises(PermissionError, match="cannot write in the folder .*labels/cells"):
        check_label_target(path, "cells", shape=(4, 48, 64), overwrite=True)
    with pytest.raises(PermissionError, match="cannot write in the folder .*labels/cells"):
        write_label_image(path, "cells", np.zeros((4, 48, 64), np.uint8), overwrite=True)
    assert np.asarray(open_label_image(path, "cells").data[...]).min() == 2


def test_level_factors_believe_the_shapes_when_a_declared_scale_contradicts_them():
    from napari_sam.core.label_pyramid import level_factors

    shapes = [(1001, 777), (500, 388), (250, 194)]
    # conforming: the declared ratios are used as they are (2.002..., not 2)
    assert level_factors(shapes, [(1.0, 1.0), (2.002, 2.0026), (4.004, 4.005)])[1] == (2.002, 2.0026)
    # every level declared at scale 1: a crop of level 0 would follow; the shapes decide instead
    assert level_factors(shapes, [(1.0, 1.0)] * 3)[2] == (round(1001 / 250, 9), round(777 / 194, 9))


def _untyped(path: Path, names: str, data: np.ndarray) -> Path:
    """An NGFF 0.4 image whose axes have names and no types (the spec's SHOULD, not a MUST)."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.create_array("0", data=data, chunks=(1,) * (data.ndim - 2) + (32, 32))
    root.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a} for a in names],
                                  "datasets": [{"path": "0", "coordinateTransformations": [
                                      {"type": "scale", "scale": [1.0] * data.ndim}]}]}]
    return path


def test_axes_without_types_get_their_types_and_unknown_ones_are_refused_before_any_work(tmp_path):
    data = np.zeros((3, 40, 48), np.uint8)
    path = _untyped(tmp_path / "named.ome.zarr", "zyx", data)
    labels = np.zeros((3, 40, 48), np.uint16)
    labels[1, 5:9, 5:9] = 4
    write_label_image(path, "cells", labels)
    meta = json.loads((path / "labels" / "cells" / ".zattrs").read_text())["multiscales"][0]
    assert [(a["name"], a["type"]) for a in meta["axes"]] == [("z", "space"), ("y", "space"), ("x", "space")]
    np.testing.assert_array_equal(zarr.open_array(str(path / "labels" / "cells" / "0"))[...], labels)
    odd = _untyped(tmp_path / "odd.ome.zarr", ["q", "r", "x"], data)
    with pytest.raises(ValueError, match="its axes .* do not make valid label axes"):
        check_label_target(odd, "cells", shape=(3, 40, 48))
    assert not (odd / "labels").exists()
