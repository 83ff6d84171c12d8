import copy

import numpy as np
import pytest
from skimage.draw import disk
from skimage.measure import regionprops

from napari_sam.cli import main
from napari_sam.core.embeddings import Embeddings
from napari_sam.core.prompts import Prompt
from napari_sam.core.scale import MAGNIFICATIONS, estimate_diameter, magnification_for
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
