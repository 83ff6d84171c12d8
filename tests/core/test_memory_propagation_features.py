"""SAM 2's frame features in the embedding cache: packed and unpacked exactly, reused only
under their signature, never half written, beside SAM's embeddings in one cache."""

import warnings

import numpy as np
import pytest
import torch
from test_memory_propagation import reference_sam2, two_disks

from napari_sam.core.embedding_store import CacheMismatchError, describe_cache
from napari_sam.core.embeddings import Embeddings
from napari_sam.core.masks import PlaneMask
from napari_sam.core.memory_propagation import propagate_objects
from napari_sam.core.preprocess import Normalization
from napari_sam.core.sam2_features import Sam2Features, feature_levels, pack, unpack


@pytest.fixture(scope="module")
def sam2():
    return reference_sam2()


def test_levels_pack_into_one_block_and_back_exactly(sam2):
    levels = feature_levels(sam2)
    assert levels == [(4, 32, 32), (8, 16, 16), (32, 8, 8)]  # d_model 32 at S=128: /8, /4 after conv_s0/s1
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in levels]
    packed = pack(arrays)
    assert packed.shape == (4 * 16 + 8 * 4 + 32, 8, 8)
    for a, b in zip(unpack(packed, levels), arrays):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="do not match"):
        unpack(packed[:-1], levels)


def test_features_are_what_the_model_gives_and_come_back_from_the_cache(sam2, tmp_path):
    volume, _ = two_disks()
    first = Sam2Features(volume, sam2, tmp_path / "c.zarr", axes="ZYX")
    window = first.windows[0, 0]
    out = first.backbone(2, window)
    assert first.computed == 1 and first.is_cached(2, window) and not first.is_cached(3, window)
    from napari_sam.model.sam2.image_predictor import preprocess

    config = sam2.config
    x = preprocess(first.image(2, window), config.image_size, config.pixel_mean, config.pixel_std)
    with torch.inference_mode():
        direct = sam2.forward_image(x)
    for a, b in zip(out["backbone_fpn"], direct["backbone_fpn"]):
        torch.testing.assert_close(a, b)
    for a, b in zip(out["vision_pos_enc"], direct["vision_pos_enc"]):
        torch.testing.assert_close(a, b)
    assert out["vision_features"] is out["backbone_fpn"][-1]
    again = Sam2Features(volume, sam2, tmp_path / "c.zarr", axes="ZYX")
    for a, b in zip(again.backbone(2, window)["backbone_fpn"], out["backbone_fpn"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert again.computed == 0


def test_features_of_other_data_or_settings_are_never_used(sam2, tmp_path):
    volume, _ = two_disks()
    cache = tmp_path / "c.zarr"
    base = Sam2Features(volume, sam2, cache, axes="ZYX", on_mismatch="error")
    base.backbone(0, base.windows[0, 0])
    changed = volume.copy()
    changed[5, 0, 0] += 1
    other = reference_sam2(image_size=128)
    with torch.no_grad():
        next(other.memory_encoder.parameters()).add_(0.01)  # other weights, same shapes
    for field, kwargs in {
        "image_fingerprint": dict(image=changed),
        "normalization": dict(normalization=Normalization(high=99.0)),
        "tile": dict(step=16),  # the window lattice
        "storage": dict(storage="float16"),
        "checkpoint": dict(model=other),
    }.items():
        def open_(on_mismatch, kwargs=kwargs):
            kw = dict(image=volume, model=sam2, axes="ZYX") | kwargs
            return Sam2Features(kw.pop("image"), kw.pop("model"), cache, on_mismatch=on_mismatch, **kw)

        with pytest.raises(CacheMismatchError, match=f"{field}: "):
            open_("error")
        with pytest.warns(UserWarning, match=f"{field}: "):
            fresh = open_("keep")
        assert not fresh.is_cached(0, fresh.windows[0, 0])
    assert base.is_cached(0, base.windows[0, 0])


def test_an_interrupted_or_damaged_write_is_computed_again(sam2, tmp_path, monkeypatch):
    volume, _ = two_disks()
    cache = tmp_path / "c.zarr"
    features = Sam2Features(volume, sam2, cache, axes="ZYX")
    window = features.windows[0, 0]
    reference = [t.clone() for t in features.backbone(1, window)["backbone_fpn"]]
    entry = features.entry(1, window)
    # a crash after the features chunk, before its checksum: the entry is absent
    features.store.forget(entry)
    reopened = Sam2Features(volume, sam2, cache, axes="ZYX")
    assert not reopened.is_cached(1, window)

    def torn(*args):
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(reopened.store, "write", torn)
    with pytest.raises(KeyboardInterrupt):
        reopened.backbone(1, window)
    assert not reopened.is_cached(1, window)
    monkeypatch.undo()
    # a damaged chunk: its checksum no longer matches, the entry is computed again
    store = reopened.store
    store.features[entry] = np.zeros(store.feature_shape, store.features.dtype)
    healed = Sam2Features(volume, sam2, cache, axes="ZYX")
    out = healed.backbone(1, window)["backbone_fpn"]
    assert healed.computed == 1
    for a, b in zip(out, reference):
        torch.testing.assert_close(a, b)


def test_sam_embeddings_and_sam2_features_share_one_cache_quietly(sam2, tiny_model, tmp_path):
    volume, _ = two_disks()
    cache = tmp_path / "c.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Embeddings(volume, tiny_model, cache, axes="ZYX").embedding_for(0)
        features = Sam2Features(volume, sam2, cache, axes="ZYX")
        features.backbone(0, features.windows[0, 0])
        Embeddings(volume, tiny_model, cache, axes="ZYX", on_mismatch="replace").embedding_for(1)
    kinds = sorted(tuple(c["layout"]) for c in describe_cache(cache))
    assert len(kinds) == 2  # "replace" of SAM's entries left SAM 2's alone
    assert Sam2Features(volume, sam2, cache, axes="ZYX").is_cached(0, features.windows[0, 0])


def test_float16_storage_propagates_like_float32(sam2, tmp_path):
    volume, seeds = two_disks()
    objects = {i: {3: PlaneMask.from_full(seeds[3] == i)} for i in (1, 2)}
    results = {}
    for storage in ("float32", "float16"):
        features = Sam2Features(volume, sam2, tmp_path / f"{storage}.zarr", axes="ZYX", storage=storage)
        results[storage] = {(s.plane, i): m.to_full((64, 80)) for s in propagate_objects(features, objects)
                            for i, m in s.masks.items()}
        assert features.store.features.dtype == np.dtype(storage)
    assert results["float16"].keys() == results["float32"].keys()
    for key, a in results["float32"].items():
        b = results["float16"][key]
        assert (a & b).sum() / (a | b).sum() > 0.99, key
