import copy
import dataclasses

import numpy as np
import pytest
from skimage.draw import disk
from skimage.measure import regionprops

from napari_sam.api import Annotator
from napari_sam.cli import main
from napari_sam.core import scale
from napari_sam.core.embeddings import Embeddings
from napari_sam.core.image_source import ImageSource
from napari_sam.core.object_scale import object_magnification, segment_at_object_scale
from napari_sam.core.prompts import Prompt
from napari_sam.core.scale import MAGNIFICATIONS, ObjectDiameters, estimate_diameter, magnification_for
from napari_sam.core.tiled_segmentation import carry_answer
from napari_sam.core.tiling import default_tiling


def _discs(diameter: float, shape=(400, 400), seed=0, dark=False, touching=True) -> np.ndarray:
    """Noisy uint16 plane of discs of one diameter on a grid, pairs of them touching."""
    rng = np.random.default_rng(seed)
    plane = np.zeros(shape, np.float32)
    step = int(diameter * 2.2)
    r = diameter / 2
    for y in range(step // 2, shape[0] - step // 2, step):
        for x in range(step // 2, shape[1] - step // 2, step):
            plane[disk((y, x), r, shape=shape)] = rng.uniform(0.6, 1.0)
            if touching and (x // step) % 3 == 0:
                plane[disk((y, x + diameter * 0.9), r, shape=shape)] = rng.uniform(0.6, 1.0)
    plane = plane + rng.normal(0, 0.05, shape) + 0.1
    if dark:
        plane = 1.2 - plane
    return np.clip(plane * 20000, 0, 65535).astype(np.uint16)


@pytest.mark.parametrize("diameter", [9, 16, 40])
@pytest.mark.parametrize("dark", [False, True])
def test_the_diameter_is_read_from_bright_or_dark_objects(diameter, dark):
    est = estimate_diameter(_discs(diameter, dark=dark))
    assert est is not None and 0.8 * diameter <= est <= 1.2 * diameter, est


@pytest.mark.parametrize("dark", [False, True])
def test_a_rare_bright_band_does_not_take_the_threshold(dark):
    # dim nuclei of 16 pixels and a saturated diagonal band 30 pixels wide over about 3 %
    # of the plane, as debris lies on some DSB planes: Otsu's two classes alone split the
    # band from everything else and measure the band
    plane = _discs(16, (400, 400), touching=False).astype(np.float32)
    if dark:
        plane = 1.2 * 20000 - plane
    yy, xx = np.mgrid[:400, :400]
    band = np.abs(yy - xx - 150) < 15 / np.sqrt(0.5)
    band &= (yy > 250)
    assert 0.01 < band.mean() < 0.05
    plane[band] = 0 if dark else 65535
    est = estimate_diameter(np.clip(plane, 0, 65535).astype(np.uint16))
    assert est is not None and 13 <= est <= 19, est


def test_stained_tissue_is_read_from_its_haematoxylin():
    # pink tissue, purple-dark nuclei of 24 pixels, a white hole: grey values would split
    # tissue from the hole
    plane = np.zeros((300, 300, 3), np.float32) + [235, 170, 205]
    plane[200:260, 20:120] = 250
    labels = (_discs(24, (300, 300), touching=False) > 12000)
    plane[labels] = [90, 50, 140]
    rng = np.random.default_rng(1)
    rgb = np.clip(plane + rng.normal(0, 6, plane.shape), 0, 255).astype(np.uint8)
    est = estimate_diameter(rgb)
    assert est is not None and 19 <= est <= 29, est


def test_real_nuclei_and_flat_planes(nuclei_2d):
    image, labels = nuclei_2d
    truth = np.median([r.equivalent_diameter_area for r in regionprops(labels) if r.area >= 16])
    est = estimate_diameter(image)
    assert abs(est / truth - 1) < 0.15, (est, truth)
    assert estimate_diameter(np.full((64, 64), 7, np.uint8)) is None
    with pytest.raises(ValueError, match="plane"):
        estimate_diameter(np.zeros((2, 3, 4, 5)))


def test_tiling_follows_the_magnification():
    assert default_tiling(1024) == (768, 128)
    assert default_tiling(256) == (192, 32)
    tile, halo = default_tiling(256, 2.0)
    assert tile + 2 * halo == 128 and halo == 16
    tile, halo = default_tiling(256, 0.5)
    assert tile + 2 * halo == 512


def _with_scale(model, scale):
    advised = copy.copy(model)  # shares the weights; only the metadata differs
    advised.metadata = dict(model.metadata, scale=scale)
    return advised


def test_magnification_rules(tiny_model):
    assert magnification_for(tiny_model) == 1.0  # no advice: as SAM always embedded
    assert magnification_for(tiny_model, magnification=2.5) == 2.5
    for bad in (0.0, 100, float("nan")):
        with pytest.raises(ValueError, match="between"):
            magnification_for(tiny_model, magnification=bad)
    with pytest.raises(ValueError, match="'auto'"):
        magnification_for(tiny_model, magnification="twice")
    with pytest.raises(ValueError, match="give a magnification instead"):
        magnification_for(tiny_model, diameter=12)  # SAM's weights do not say what size they want
    with pytest.raises(ValueError, match="positive number of pixels"):
        magnification_for(_with_scale(tiny_model, {"object_diameter": 20.0}), diameter=-3)
    assert magnification_for(_with_scale(tiny_model, {"magnification": 2.0})) == 2.0
    advised = _with_scale(tiny_model, {"object_diameter": 20.0})
    assert magnification_for(advised, diameter=10) == 2.0
    assert magnification_for(advised, diameter=15) == 1.25  # 1.33 rounded on a log scale
    assert magnification_for(advised, diameter=1000) == min(MAGNIFICATIONS)
    calls = []

    def plane():
        calls.append(1)
        return _discs(10)

    assert magnification_for(advised, plane) == 2.0 and len(calls) == 1
    assert magnification_for(advised, plane, magnification=1.5) == 1.5 and len(calls) == 1  # not read
    # nothing to measure: the model's fixed value, else 1
    assert magnification_for(advised, np.zeros((50, 50), np.uint8)) == 1.0


def test_embeddings_embed_at_the_chosen_magnification(tiny_model):
    plane = _discs(10, (300, 300))
    size = tiny_model.config.image_size
    plain = Embeddings(plane, tiny_model, cache=False, axes="YX")
    assert plain.magnification == 1.0 and plain.grid.grid_shape == (1, 1)
    m = size / 128  # 128-pixel regions
    emb = Embeddings(plane, tiny_model, cache=False, axes="YX", magnification=m)
    assert emb.magnification == m and emb.grid.tile + 2 * emb.grid.halo == 128 and emb.grid.grid_shape == (4, 4)
    assert emb.signature.tile != plain.signature.tile  # a cache of one never answers for the other
    advised = Embeddings(plane, _with_scale(tiny_model, {"object_diameter": 10.0 * m}), cache=False, axes="YX")
    assert advised.magnification == min(MAGNIFICATIONS, key=lambda v: abs(np.log(v / m)))
    obj = emb.segment(0, Prompt.make(points=[(150.0, 150.0)]))
    assert obj.to_full(plane.shape).shape == plane.shape
    native = emb.at_magnification(1.0)  # what the instance decoder's modes read
    assert native.magnification == 1.0 and native.grid == plain.grid and native.source is emb.source
    assert emb.at_magnification(1.0) is native and emb.at_magnification(m) is emb
    given = Embeddings(plane, tiny_model, cache=False, axes="YX", tile=100, halo=14)
    assert given.magnification == size / 128 and given.grid.tile == 100



def _counting_estimates(monkeypatch) -> list:
    """Every plane :func:`estimate_diameter` reads, through the module that calls it."""
    calls = []

    def counted(plane):
        calls.append(np.asarray(plane).shape)
        return estimate_diameter(plane)

    monkeypatch.setattr(scale, "estimate_diameter", counted)
    return calls


def test_each_planes_diameter_is_estimated_once_and_a_given_one_is_used_everywhere(monkeypatch):
    volume = np.stack([_discs(10), _discs(30), _discs(16)])  # (Z, Y, X), three sizes
    source = ImageSource(volume, "ZYX")
    calls = _counting_estimates(monkeypatch)
    diameters = ObjectDiameters(source)
    first = diameters.of(1)
    assert 24 <= first <= 36 and diameters.of(1) == first and diameters.of() == first  # middle plane
    assert 8 <= diameters.of(0) <= 12 and 13 <= diameters.of(2) <= 19
    assert len(calls) == 3  # one per plane, whoever asks again
    given = ObjectDiameters(source, 22)
    assert [given.of(z) for z in range(3)] == [22.0] * 3 and len(calls) == 3  # nothing read
    for bad in (0, -4, float("nan")):
        with pytest.raises(ValueError, match="positive number of pixels"):
            ObjectDiameters(source, bad)
    assert ObjectDiameters(ImageSource(np.full((64, 64), 7, np.uint8), "YX")).of(0) is None  # nothing to measure


def test_embeddings_keep_the_diameter_they_chose_their_magnification_by(tiny_model, monkeypatch):
    plane = _discs(10, (300, 300))
    advised = _with_scale(tiny_model, {"object_diameter": 20.0})
    calls = _counting_estimates(monkeypatch)
    emb = Embeddings(plane, advised, cache=False, axes="YX")
    assert emb.magnification == 2.0 and len(calls) == 1
    native = emb.at_magnification(1.0)  # where AIS reads: the same diameters, not a new estimate
    assert native.diameters is emb.diameters and native.diameters.of(0) == emb.diameters.of(0) and len(calls) == 1
    given = Embeddings(plane, advised, cache=False, axes="YX", diameter=20)
    assert given.magnification == 1.0 and given.at_magnification(2.0).diameters.of(0) == 20.0 and len(calls) == 1
    fixed = Embeddings(plane, advised, cache=False, axes="YX", magnification=1.5)  # nothing wanted: nothing read
    assert fixed.magnification == 1.5 and len(calls) == 1 and fixed.diameters.of(0) is not None and len(calls) == 2
    with pytest.raises(ValueError, match="give a magnification instead"):
        Embeddings(plane, tiny_model, cache=False, axes="YX", diameter=12)  # the model wants no size

def test_command_line_magnification(tmp_path, tiny_checkpoint, capsys):
    import tifffile

    path = tmp_path / "plane.tif"
    tifffile.imwrite(path, _discs(10, (300, 300)))
    args = ["embed", str(path), "--model", str(tiny_checkpoint), "--dtype", "float32",
            "--out", str(tmp_path / "c.zarr")]
    assert main(args + ["--magnification", "8"]) == 0
    out = capsys.readouterr().out
    assert "(magnification 8)" in out and "4x4 tile(s) per plane" in out
    with pytest.raises(SystemExit):
        main(args + ["--magnification", "big"])
    assert "a number or 'auto'" in capsys.readouterr().err


def test_a_scale_matched_instance_decoder_reads_the_prompts_embeddings(tiny_model):
    from napari_sam.auto.modes import _for_decoder, reads_native_scale

    plane = _discs(10, (300, 300))
    m = tiny_model.config.image_size / 128
    emb = Embeddings(plane, tiny_model, cache=False, axes="YX", magnification=m)
    # micro-sam's decoders and ours before 2026-12-04 learned at the planes' own scale
    assert reads_native_scale(tiny_model) and _for_decoder(tiny_model, emb) is emb.at_magnification(1.0)
    matched = _with_scale(tiny_model, {"object_diameter": 10.0 * m})
    matched.metadata["instance_decoder"] = {"scale_matched": True}
    assert not reads_native_scale(matched) and _for_decoder(matched, emb) is emb
    matched.metadata["instance_decoder"] = {"scale_matched": "yes"}  # only a JSON true counts
    assert reads_native_scale(matched)


# -- each prompted object at its own scale (napari_sam.core.object_scale) --
ADVICE = {"object_diameter": 10.0, "box_diameter": 20.0}
MANY_TILES = (1100, 1100)  # 2 x 2 tiles of the tiny model's 1024-pixel input at magnification 1


def test_object_magnification_shows_the_object_at_the_wanted_size():
    assert object_magnification(10, 20) == 2.0
    assert object_magnification(7, 20) == 3.0  # 2.86, and never above 3
    assert object_magnification(16, 20) == 1.25
    assert object_magnification(60, 20) == 1.0  # never shrunk
    assert object_magnification(0, 20) == 3.0  # a degenerate size is not a division by zero


def test_a_box_is_answered_at_its_own_scale_and_corrected_there(tiny_model):
    plane = _discs(10, MANY_TILES)
    emb = Embeddings(plane, _with_scale(tiny_model, ADVICE), cache=False, axes="YX")
    assert emb.magnification == 1.0 and emb.magnification_advised
    box = Prompt.make(box=(100, 100, 110, 110))  # (x0, y0, x1, y1): 10 pixels, shown 20 across at 2
    answer = segment_at_object_scale(emb, 0, box)
    assert answer.magnification == 2.0
    np.testing.assert_array_equal(answer.to_full(plane.shape),
                                  emb.at_magnification(2.0).segment(0, box).to_full(plane.shape))
    assert segment_at_object_scale(emb, 0, Prompt.make(box=(100, 100, 107, 107))).magnification == 3.0
    assert segment_at_object_scale(emb, 0, Prompt.make(box=(0, 0, 60, 60))).magnification == 1.0
    # A correction goes where its logits were made, even when asked of the plane's embeddings.
    fix = Prompt.make(points=[(105, 105)], labels=[1], box=(100, 100, 110, 110), previous=answer)
    again = emb.segment(0, fix)
    assert again.magnification == 2.0
    np.testing.assert_array_equal(again.to_full(plane.shape),
                                  emb.at_magnification(2.0).segment(0, fix).to_full(plane.shape))
    assert segment_at_object_scale(emb, 0, fix).magnification == 2.0
    # cropping keeps the frame
    assert answer.cropped().magnification == 2.0


def test_the_users_magnification_and_models_without_the_advice_answer_everything(tiny_model):
    plane = _discs(10, MANY_TILES)
    box = Prompt.make(box=(100, 100, 110, 110))
    given = Embeddings(plane, _with_scale(tiny_model, ADVICE), cache=False, axes="YX", magnification=1.5)
    assert not given.magnification_advised
    assert segment_at_object_scale(given, 0, box).magnification == 1.5
    tiled = Embeddings(plane, _with_scale(tiny_model, ADVICE), cache=False, axes="YX", tile=100, halo=14)
    assert not tiled.magnification_advised
    plane_only = Embeddings(plane, _with_scale(tiny_model, {"object_diameter": 10.0}), cache=False, axes="YX")
    assert segment_at_object_scale(plane_only, 0, box).magnification == plane_only.magnification
    sam = Embeddings(plane, tiny_model, cache=False, axes="YX")
    assert segment_at_object_scale(sam, 0, box).magnification == 1.0
    assert not sam.__dict__.get("_siblings")  # nothing else was embedded


def test_a_plane_of_one_tile_answers_everything_at_its_magnification(tiny_model):
    # one tile fills the model input whatever the magnification up to 3.4 here
    plane = _discs(10, (300, 300))
    emb = Embeddings(plane, _with_scale(tiny_model, ADVICE), cache=False, axes="YX")
    assert len(emb.grid) == 1 and emb.magnification_advised
    box = segment_at_object_scale(emb, 0, Prompt.make(box=(100, 100, 107, 107)))
    assert box.magnification == 1.0
    first = segment_at_object_scale(emb, 0, Prompt.make(points=[(105.0, 105.0)]))
    small = dataclasses.replace(first, region=(100, 110, 100, 110), mask=np.ones((10, 10), bool))
    fix = Prompt.make(points=[(105.0, 105.0), (112.0, 112.0)], labels=[1, 0], previous=small)
    assert segment_at_object_scale(emb, 0, fix).magnification == 1.0
    assert not emb.__dict__.get("_siblings")  # nothing else was embedded


def test_a_click_stays_at_the_planes_magnification(tiny_model):
    plane = _discs(10, MANY_TILES)
    emb = Embeddings(plane, _with_scale(tiny_model, ADVICE), cache=False, axes="YX")
    click = Prompt.make(points=[(150.0, 150.0)])
    answer = segment_at_object_scale(emb, 0, click)
    assert answer.magnification == emb.magnification == 1.0 and not emb.__dict__.get("_siblings")
    np.testing.assert_array_equal(answer.to_full(plane.shape), emb.segment(0, click).to_full(plane.shape))


def test_a_corrected_click_moves_to_its_objects_scale_with_its_logits(tiny_model):
    plane = _discs(10, MANY_TILES)
    emb = Embeddings(plane, _with_scale(tiny_model, ADVICE), cache=False, axes="YX")
    first = segment_at_object_scale(emb, 0, Prompt.make(points=[(105.0, 105.0)]))
    assert first.magnification == 1.0 and first.logits is not None
    # as if the click's answer were 10 pixels across: its box asks for 2x (20 across)
    small = dataclasses.replace(first, region=(100, 110, 100, 110), mask=np.ones((10, 10), bool))
    fix = Prompt.make(points=[(105.0, 105.0), (112.0, 112.0)], labels=[1, 0], previous=small)
    moved = segment_at_object_scale(emb, 0, fix)
    assert moved.magnification == 2.0
    there = emb.at_magnification(2.0)
    carried = carry_answer(small, emb.grid, there.grid, fix, tiny_model.config.image_size, 2.0)
    expected = there.segment(0, dataclasses.replace(fix, previous=carried))
    np.testing.assert_array_equal(moved.to_full(plane.shape), expected.to_full(plane.shape))
    np.testing.assert_array_equal(moved.logits, expected.logits)
    fresh = there.segment(0, dataclasses.replace(fix, previous=None))
    assert not np.array_equal(moved.logits, fresh.logits)  # the earlier answer was the mask prompt
    # the object stays at its scale for the corrections that follow
    more = Prompt.make(points=[(105.0, 105.0), (112.0, 112.0), (100.0, 108.0)], labels=[1, 0, 1], previous=moved)
    assert segment_at_object_scale(emb, 0, more).magnification == 2.0
    # an answer the plane's magnification suits is corrected there, as before
    wide = dataclasses.replace(first, region=(95, 115, 95, 115), mask=np.ones((20, 20), bool))
    stay = dataclasses.replace(fix, previous=wide)
    kept = segment_at_object_scale(emb, 0, stay)
    assert kept.magnification == 1.0
    np.testing.assert_array_equal(kept.to_full(plane.shape), emb.segment(0, stay).to_full(plane.shape))
    # the user's magnification: nothing moves
    given = Embeddings(plane, _with_scale(tiny_model, ADVICE), cache=False, axes="YX", magnification=1.0)
    assert segment_at_object_scale(given, 0, fix).magnification == 1.0


def test_the_annotator_answers_a_box_at_its_own_scale(tiny_model):
    plane = _discs(10, MANY_TILES)
    ann = Annotator(plane, _with_scale(tiny_model, ADVICE), cache=False, axes="YX")
    obj = ann.segment(0, box=(100, 100, 110, 110))
    assert obj.magnification == 2.0
    fixed = ann.segment(0, points=[(105, 105)], labels=[0], box=(100, 100, 110, 110), previous=obj)
    assert fixed.magnification == 2.0
    user = Annotator(plane, _with_scale(tiny_model, ADVICE), cache=False, axes="YX", magnification=1.0)
    assert user.segment(0, box=(100, 100, 110, 110)).magnification == 1.0
