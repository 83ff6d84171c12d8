"""AIS: micro-sam's post-processing of the instance decoder's maps, and its tiled run.

Post-processing is tested on maps with known instances, made the way torch-em's
``PerObjectDistanceTransform`` makes the decoder's training targets (checked against
torch-em's own targets in the reference sets), and against micro-sam's own
``InstanceSegmentationWithDecoder.generate`` on the reference sets in
``tests/reference/ais/`` (made by ``scripts/make_ais_reference.py``; sets under
``$NAPARI_SAM_REFERENCE_DIR/ais/`` are tested too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_sam.auto.ais import (
    AISSettings,
    instances_from_maps,
    iter_ais,
    iter_ais_volume,
    segment_ais,
    segment_ais_volume,
)
from napari_sam.auto.instance_maps import iter_instance_maps
from napari_sam.core.embeddings import Embeddings
from napari_sam.core.image_embedding import ImageEmbedding
from napari_sam.core.tiling import TileGrid
from napari_sam.model.instance_decoder import InstanceDecoder, InstanceDecoderConfig
from napari_sam.train.instance_targets import instance_targets
from tests.conftest import drain

REPO = Path(__file__).resolve().parents[2]
OWN_SETS = REPO / "tests" / "reference" / "ais"
REFERENCE_DIR = Path(os.environ.get("NAPARI_SAM_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
SETS = sorted(p.parent for folder in (OWN_SETS, REFERENCE_DIR / "ais") for p in folder.glob("*/meta.json"))


# --- maps with known instances --------------------------------------------------------


def discs(shape, centres, radii) -> np.ndarray:
    """Discs painted in order (a later disc covers an earlier one where they overlap)."""
    rows, cols = np.indices(shape)
    out = np.zeros(shape, np.int32)
    for i, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        out[(rows - cy) ** 2 + (cols - cx) ** 2 <= r * r] = i
    return out


def matched_ious(truth: np.ndarray, found: np.ndarray) -> list[float]:
    """For each true object, the IoU of the found object that overlaps it most."""
    ious = []
    for i in np.unique(truth[truth > 0]):
        obj = truth == i
        ids, counts = np.unique(found[obj], return_counts=True)
        counts[ids == 0] = 0
        best = ids[np.argmax(counts)]
        other = found == best
        ious.append(float((obj & other).sum() / (obj | other).sum()) if best else 0.0)
    return ious


def test_five_discs_are_recovered():
    truth = discs((128, 160), [(30, 30), (30, 110), (95, 40), (90, 120), (64, 75)], [14, 18, 10, 22, 8])
    labels = instances_from_maps(*instance_targets(truth))
    assert labels.dtype == np.uint32 and labels.shape == truth.shape
    np.testing.assert_array_equal(np.unique(labels), np.arange(6))
    ious = matched_ious(truth, labels)
    assert min(ious) > 0.9, ious
    # one found object per true object: no object is split or merged
    assert len({int(np.bincount(labels[truth == i]).argmax()) for i in range(1, 6)}) == 5


def test_touching_objects_are_split():
    # two discs whose union is one connected blob, and a third touching the second
    truth = discs((96, 160), [(48, 40), (48, 80), (48, 122)], [22, 22, 20])
    assert ndi.label(truth > 0)[1] == 1
    labels = instances_from_maps(*instance_targets(truth))
    assert labels.max() == 3
    assert min(matched_ious(truth, labels)) > 0.9


def test_objects_under_min_size_are_removed_and_ids_stay_dense():
    truth = discs((96, 96), [(20, 20), (70, 70), (20, 75)], [12, 15, 5])  # the last: 81 pixels
    maps = instance_targets(truth)
    kept_all = instances_from_maps(*maps, AISSettings(min_size=0))
    assert kept_all.max() == 3
    small = kept_all[20, 75]
    assert small > 0 and (kept_all == small).sum() < 100
    labels = instances_from_maps(*maps, AISSettings(min_size=100))
    np.testing.assert_array_equal(np.unique(labels), [0, 1, 2])
    assert labels[20, 75] == 0
    assert min(matched_ious(np.where(truth == 3, 0, truth), labels)) > 0.9
    # an object of exactly min_size pixels is kept (as micro-sam keeps it)
    exact = instances_from_maps(*maps, AISSettings(min_size=int((kept_all == small).sum())))
    assert exact.max() == 3


def test_background_and_foreground_without_seed_stay_empty():
    fg = np.zeros((40, 50), np.float32)
    assert instances_from_maps(fg, np.ones_like(fg), np.ones_like(fg)).max() == 0
    # foreground, but no pixel near a centre: no seed, so nothing
    assert instances_from_maps(np.ones_like(fg), np.ones_like(fg), np.ones_like(fg)).max() == 0


def test_large_objects_stay_whole_when_smoothing_follows_their_diameter():
    # Three discs 72-76 pixels across whose distance maps carry smooth noise, as a coarse
    # decoder leaves on large objects: micro-sam's fixed sigma of 1.6 pixels seeds each
    # several times; a sigma of a seventh of the diameter seeds each once.
    truth = discs((200, 300), [(100, 70), (100, 150), (100, 230)], [38, 36, 38])
    fg, centre, boundary = instance_targets(truth)
    noise = ndi.gaussian_filter(np.random.default_rng(0).normal(0, 1, truth.shape), 3)
    noise = 0.3 * noise / noise.std()
    maps = (fg, np.clip(centre + noise, 0, 1), np.clip(boundary + noise, 0, 1))
    fixed = instances_from_maps(*maps, AISSettings())
    scaled = AISSettings(distance_smoothing_per_diameter=1 / 7)
    whole = instances_from_maps(*maps, scaled, diameter=75.0)
    assert fixed.max() > 6 and whole.max() == 3
    assert min(matched_ious(truth, whole)) > 0.95
    # the sigma it used, given in pixels, answers the same; unknown diameters keep the fixed one
    np.testing.assert_array_equal(whole, instances_from_maps(*maps, AISSettings(distance_smoothing=75 / 7)))
    np.testing.assert_array_equal(instances_from_maps(*maps, scaled), fixed)
    np.testing.assert_array_equal(instances_from_maps(*maps, scaled, diameter=float("nan")), fixed)


def test_defaults_are_micro_sams_generate_defaults():
    s = AISSettings()
    assert (s.center_distance_threshold, s.boundary_distance_threshold, s.foreground_threshold) == (0.5, 0.5, 0.5)
    assert (s.foreground_smoothing, s.distance_smoothing, s.min_size) == (1.0, 1.6, 0)
    assert s.distance_smoothing_per_diameter == 0  # micro-sam has no such setting


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"distance_smoothing": -1.0}, "distance_smoothing"),
        ({"foreground_smoothing": float("nan")}, "foreground_smoothing"),
        ({"min_size": -3}, "min_size"),
        ({"distance_smoothing_per_diameter": -0.1}, "distance_smoothing_per_diameter"),
        ({"min_size": 2.5}, "min_size"),
        ({"center_distance_threshold": "0.5"}, "center_distance_threshold"),
    ],
)
def test_bad_settings_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AISSettings(**kwargs)


def test_bad_maps_are_named():
    good = np.zeros((8, 9), np.float32)
    with pytest.raises(ValueError, match="center_distances has shape"):
        instances_from_maps(good, np.zeros((8, 8)), good)
    with pytest.raises(ValueError, match="boundary_distances holds NaN"):
        instances_from_maps(good, good, np.full((8, 9), np.nan))
    with pytest.raises(ValueError, match="foreground must be a non-empty"):
        instances_from_maps(np.zeros((2, 8, 9)), good, good)


# --- parity with micro-sam's own post-processing --------------------------------------


def test_committed_reference_sets_are_found():
    assert {"seed0", "seed2_dense"} <= {p.name for p in SETS if p.parent == OWN_SETS}


@pytest.fixture(scope="module", params=SETS, ids=[p.name for p in SETS])
def reference(request):
    folder = request.param
    return json.loads((folder / "meta.json").read_text()), dict(np.load(folder / "data.npz"))


def test_distance_maps_of_the_tests_are_torch_ems(reference):
    """The maps these tests build are the decoder's training targets as torch-em makes them."""
    _, data = reference
    ours = instance_targets(data["instances"].astype(np.int32))
    # stored as float16: 1e-3 is its rounding near 1
    np.testing.assert_allclose(ours, data["targets"].astype(np.float32), atol=1e-3, rtol=0)


def test_labels_match_micro_sams_generate(reference):
    meta, data = reference
    maps = data["maps"].astype(np.float32)
    for case, spec in meta["cases"].items():
        expected = data[f"labels_{case}"]
        got = instances_from_maps(maps[0], maps[1], maps[2], AISSettings(**spec["generate"]))
        assert got.max() == expected.max(), case
        # Same ids in the same order; the two watersheds may flood pixels of equal height in
        # another order (micro-sam's quantises heights to 16 bits), which moves a few pixels.
        differ = int((got != expected).sum())
        assert differ <= 1e-3 * expected.size, (case, differ)
        np.testing.assert_array_equal(got > 0, expected > 0)


# --- tiled decoding -------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_decoder():
    """A narrow instance decoder with random weights and batch-norm statistics."""
    torch.manual_seed(3)
    decoder = InstanceDecoder(InstanceDecoderConfig(initial_features=4))
    with torch.no_grad():
        for name, buf in decoder.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.2)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return decoder.eval()


def _median_settings(maps: np.ndarray) -> AISSettings:
    """Thresholds at the maps' medians: a random decoder's maps then hold many objects."""
    fg, centre, boundary = (float(np.median(m)) for m in maps)
    return AISSettings(center_distance_threshold=centre, boundary_distance_threshold=boundary,
                       foreground_threshold=fg)


def test_tiled_maps_are_each_tiles_maps_inside_its_interior(tiny_model, random_decoder):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (1100, 200), dtype=np.uint8)  # taller than the 1024 input
    emb = Embeddings(image, tiny_model, cache=False)
    assert emb.grid.grid_shape == (2, 1)
    reports, maps = drain(iter_instance_maps(emb, 0, random_decoder))
    assert maps.shape == (3, 1100, 200) and maps.dtype == np.float32
    assert [(r.done, r.total, r.tile, r.stage) for r in reports] == [(1, 2, (0, 0), "tiles"), (2, 2, (1, 0), "tiles")]
    covered = np.zeros(image.shape, int)
    for tile in emb.grid:
        e = emb.embedding_for(0, tile.index)
        assert e.original_size == tile.shape
        with torch.no_grad():
            alone = random_decoder(e.features, e.input_size, e.original_size, 1024)[0].numpy()
        y0, y1, x0, x1 = tile.inner
        np.testing.assert_allclose(maps[:, y0:y1, x0:x1], alone[(slice(None), *tile.inner_in_outer)], atol=1e-5)
        covered[y0:y1, x0:x1] += 1
    np.testing.assert_array_equal(covered, 1)
    # batched decoding gives the same maps
    _, batched = drain(iter_instance_maps(emb, 0, random_decoder, batch_size=2))
    np.testing.assert_allclose(batched, maps, atol=1e-5)
    # and AIS post-processes exactly these maps
    settings = _median_settings(maps)
    labels = segment_ais(emb, 0, random_decoder, settings)
    assert labels.max() > 1
    np.testing.assert_array_equal(labels, instances_from_maps(*maps, settings))


def test_one_tile_plane_is_the_untiled_decode_and_postprocessing(tiny_model, random_decoder):
    image = np.random.default_rng(1).integers(0, 255, (96, 128), dtype=np.uint8)
    emb = Embeddings(image, tiny_model, cache=False)
    assert len(emb.grid) == 1
    e = emb.embedding_for(0)
    with torch.no_grad():
        maps = random_decoder(e.features, e.input_size, e.original_size)[0].numpy()
    settings = _median_settings(maps)
    seen = []
    labels = segment_ais(emb, 0, random_decoder, settings, progress=seen.append)
    assert labels.max() > 1
    np.testing.assert_array_equal(labels, instances_from_maps(*maps, settings))
    assert [(p.done, p.total) for p in seen] == [(1, 1)]



def test_smoothing_that_follows_the_diameter_takes_the_one_the_user_gave(tiny_model, random_decoder):
    import copy
    import dataclasses

    image = np.random.default_rng(1).integers(0, 255, (96, 128), dtype=np.uint8)
    sized = copy.copy(tiny_model)  # a model that records the object size it wants, so a diameter may be given
    sized.metadata = dict(tiny_model.metadata, scale={"object_diameter": 30.0})
    emb = Embeddings(image, sized, cache=False, diameter=30)
    assert emb.magnification == 1.0
    e = emb.embedding_for(0)
    with torch.no_grad():
        maps = random_decoder(e.features, e.input_size, e.original_size)[0].numpy()
    settings = dataclasses.replace(_median_settings(maps), distance_smoothing=0.5, distance_smoothing_per_diameter=0.2)
    labels = segment_ais(emb, 0, random_decoder, settings)
    np.testing.assert_array_equal(labels, instances_from_maps(*maps, settings, diameter=30.0))  # sigma 6, not 0.5
    assert not np.array_equal(labels, instances_from_maps(*maps, settings))

def test_a_decoder_in_training_mode_is_refused(tiny_model, random_decoder):
    emb = Embeddings(np.zeros((64, 64), np.uint8), tiny_model, cache=False)
    random_decoder.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            segment_ais(emb, 0, random_decoder)
    finally:
        random_decoder.eval()
    with pytest.raises(ValueError, match="batch_size"):
        segment_ais(emb, 0, random_decoder, batch_size=0)


class _KnownMaps:
    """A stand-in for an instance decoder that answers each tile with a crop of known
    plane maps: the tile is read from its (fake) embedding, which holds its plane and
    outer region."""

    training = False

    def __init__(self, planes_maps):
        self.planes_maps = planes_maps
        self.calls = 0

    def maps(self, batch):
        self.calls += len(batch)
        return batch

    def resize(self, maps, input_size, original_size, image_size):
        plane, y0, y1, x0, x1 = (int(v) for v in maps[0, :5, 0, 0])
        assert (y1 - y0, x1 - x0) == tuple(original_size)
        return torch.as_tensor(self.planes_maps[plane][:, y0:y1, x0:x1])[None]


def _fake_embeddings(shape, n_planes, tile, halo):
    """What the AIS functions read of an Embeddings: its grid, planes and tile embeddings
    (here each tile's embedding carries its plane and outer region)."""
    grid = TileGrid(shape, tile, halo)

    def embedding_for(plane, index):
        features = np.zeros((256, 4, 4), np.float32)
        features[:5, 0, 0] = (plane, *grid[index].outer)
        return ImageEmbedding.from_array(features, grid[index].shape, 64)

    return SimpleNamespace(
        grid=grid,
        source=SimpleNamespace(n_planes=n_planes, flat_index=int),
        embedding_for=embedding_for,
        model=SimpleNamespace(config=SimpleNamespace(image_size=64)),
    )


def test_objects_across_tile_borders_are_one_object():
    shape = (96, 160)
    emb = _fake_embeddings(shape, 1, tile=40, halo=8)
    assert emb.grid.grid_shape == (3, 4)
    # borders at rows 32 and 64 and columns 40, 80 and 120: the first disc straddles a
    # row border, the second a column border, the third a corner of four tiles
    truth = discs(shape, [(32, 20), (60, 80), (64, 120), (15, 140)], [12, 14, 15, 9])
    maps = instance_targets(truth)
    decoder = _KnownMaps([maps])
    reports, stitched = drain(iter_instance_maps(emb, 0, decoder))
    assert len(reports) == 12 and decoder.calls == 12
    np.testing.assert_array_equal(stitched, maps)
    labels = segment_ais(emb, 0, decoder)
    np.testing.assert_array_equal(labels, instances_from_maps(*maps))
    assert labels.max() == 4
    assert min(matched_ious(truth, labels)) > 0.9
    # labels made per tile would cut the corner disc into four
    corner = {int(v) for v in np.unique(labels[truth == 3])} - {0}
    assert len(corner) == 1


def test_closing_the_generator_stops_decoding():
    emb = _fake_embeddings((96, 160), 1, tile=40, halo=8)
    decoder = _KnownMaps([instance_targets(discs((96, 160), [(40, 40)], [10]))])
    gen = iter_ais(emb, 0, decoder)
    first = next(gen)
    gen.close()
    assert (first.done, first.total, first.tile) == (1, 12, (0, 0))
    assert decoder.calls == 1


def test_volume_planes_are_linked_through_z():
    shape = (64, 96)
    truths = [discs(shape, [(30, 20 + z), (30, 70 - z)], [12, 10]) for z in range(3)]
    truths[2][truths[2] == 2] = 0  # the second object ends after two planes
    decoder = _KnownMaps([instance_targets(t) for t in truths])
    emb = _fake_embeddings(shape, 3, tile=40, halo=8)
    reports, (volume, planes) = drain(iter_ais_volume(emb, decoder))
    assert volume.shape == (3, *shape) and volume.dtype == np.uint32 and len(planes) == 3
    assert [r.done for r in reports if r.stage == "planes"] == [1, 2, 3]
    assert sum(r.stage == "tiles" for r in reports) == 3 * len(emb.grid)
    left = {int(volume[z, 30, 20 + z]) for z in range(3)}
    right = {int(volume[z, 30, 70 - z]) for z in range(2)}
    assert len(left) == 1 and len(right) == 1 and left != right and 0 not in left | right
    np.testing.assert_array_equal(np.unique(volume), [0, 1, 2])
    np.testing.assert_array_equal(segment_ais_volume(emb, decoder, planes=[0, 1, 2]), volume)
    with pytest.raises(ValueError, match="no planes"):
        segment_ais_volume(emb, decoder, planes=[])


def test_names_resolve_from_the_package():
    import napari_sam.auto as auto

    assert auto.segment_ais is segment_ais and auto.AISSettings is AISSettings
    assert auto.iter_instance_maps is iter_instance_maps


def test_a_decoder_that_refines_by_the_image_reads_each_tile_as_its_embedding_did(tiny_model):
    torch.manual_seed(4)
    decoder = InstanceDecoder(InstanceDecoderConfig(initial_features=4, scale=4, refine_width=4)).eval()
    with torch.no_grad():
        for p in decoder.refine.parameters():
            p.normal_(0, 0.2)
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (1100, 200), dtype=np.uint8)
    emb = Embeddings(image, tiny_model, cache=False)
    assert emb.grid.grid_shape == (2, 1)
    _, maps = drain(iter_instance_maps(emb, 0, decoder))
    for tile in emb.grid:
        e = emb.embedding_for(0, tile.index)
        model_input = emb.model_input(0, tile.index)
        assert model_input.shape == (1, 3, 1024, 1024)
        with torch.no_grad():
            # the tile's pixels as the image encoder read them for its embedding
            torch.testing.assert_close(tiny_model.image_encoder(model_input), e.features, rtol=1e-4, atol=1e-4)
            alone = decoder(e.features, e.input_size, e.original_size, 1024, image=model_input)[0].numpy()
        y0, y1, x0, x1 = tile.inner
        np.testing.assert_allclose(maps[:, y0:y1, x0:x1], alone[(slice(None), *tile.inner_in_outer)], atol=1e-5)
    # the maps depend on the pixels, not only on the embedding: the refiner is used
    with torch.no_grad():
        e = emb.embedding_for(0, (0, 0))
        blind = decoder(e.features, e.input_size, e.original_size, 1024, image=torch.zeros(1, 3, 1024, 1024))[0]
    y0, y1, x0, x1 = emb.grid[(0, 0)].inner
    assert np.abs(maps[:, y0:y1, x0:x1] - blind.numpy()[(slice(None), *emb.grid[(0, 0)].inner_in_outer)]).max() > 1e-3
