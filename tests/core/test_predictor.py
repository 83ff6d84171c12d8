import numpy as np
import pytest
import torch

from napari_sam.core.image_embedding import ImageEmbedding
from napari_sam.core.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(tiny_sam):
    p = Predictor(tiny_sam)
    rng = np.random.default_rng(1)
    p.set_image(rng.integers(0, 4000, (300, 500), dtype=np.uint16))
    return p


def test_shapes_of_a_point_prediction(predictor):
    r = predictor.predict(points=[[250, 150]], labels=[1])
    assert r.masks.shape == (3, 300, 500) and r.masks.dtype == bool
    assert r.iou.shape == (3,)
    assert r.low_res_logits.shape == (3, 256, 256)
    single = predictor.predict(points=[[250, 150]], multimask=False)
    assert single.masks.shape == (1, 300, 500)
    assert predictor.embedding.input_size == (614, 1024)  # 300 * 1024 / 500 rounded
    assert predictor.embedding.original_size == (300, 500)


def test_logits_threshold_to_masks(predictor):
    logits = predictor.predict(box=[100, 50, 300, 200], multimask=False, return_logits=True).masks
    masks = predictor.predict(box=[100, 50, 300, 200], multimask=False).masks
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits > 0, masks)


def test_several_boxes_at_once_match_one_by_one(predictor):
    boxes = np.array([[10, 10, 100, 80], [200, 100, 400, 290], [450, 5, 499, 60]], float)
    batch = predictor.predict_batch(boxes=boxes)
    assert batch.masks.shape == (3, 1, 300, 500)
    for i, box in enumerate(boxes):
        one = predictor.predict(box=box, multimask=False)
        np.testing.assert_allclose(batch.low_res_logits[i], one.low_res_logits, atol=1e-4)
        assert (batch.masks[i] == one.masks).mean() > 0.999
    assert batch.best_mask().shape == (3, 300, 500)


def test_mask_input_changes_the_answer(predictor):
    first = predictor.predict(points=[[250, 150]])
    refined = predictor.predict(points=[[250, 150]], mask_input=first.low_res_logits[first.best], multimask=False)
    plain = predictor.predict(points=[[250, 150]], multimask=False)
    assert not np.allclose(refined.low_res_logits, plain.low_res_logits)


def test_embedding_round_trip(tiny_sam, predictor):
    emb = predictor.embedding
    other = Predictor(tiny_sam)
    other.set_embedding(ImageEmbedding.from_array(emb.features.numpy()[0], emb.original_size))
    a = predictor.predict(points=[[20, 30]]).low_res_logits
    b = other.predict(points=[[20, 30]]).low_res_logits
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "empty prompt"),
        ({"points": [[500, 10]]}, "outside the 300x500 image"),
        ({"points": [[-1, 10]]}, "outside"),
        ({"points": [[10, 10]], "labels": [2]}, "1 \\(foreground\\) or 0"),
        ({"points": [[10, 10], [20, 20]], "labels": [1]}, "labels have shape"),
        ({"box": [600, 10, 700, 20]}, "entirely outside"),
        ({"box": [50, 10, 40, 20]}, "x1 > x0"),
        ({"points": [[np.nan, 3]]}, "finite"),
        ({"mask_input": np.zeros((64, 64))}, "cannot reshape|mask_input"),
    ],
)
def test_bad_prompts_are_refused_clearly(predictor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(**kwargs)


def test_box_reaching_past_the_border_is_clipped(predictor):
    clipped = predictor.predict(box=[400, 200, 900, 700], multimask=False)
    inside = predictor.predict(box=[400, 200, 500, 300], multimask=False)
    np.testing.assert_array_equal(clipped.masks, inside.masks)


def test_predict_before_an_image_is_set(tiny_sam):
    with pytest.raises(RuntimeError, match="no image is set"):
        Predictor(tiny_sam).predict(points=[[1, 1]])


def test_volume_given_to_the_2d_predictor(tiny_sam):
    with pytest.raises(ValueError, match="one plane"):
        Predictor(tiny_sam).set_image(np.zeros((10, 64, 64), np.uint8))


def test_nan_image_is_refused(tiny_sam):
    img = np.ones((64, 64), np.float32)
    img[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite values at 1 pixel"):
        Predictor(tiny_sam).set_image(img)


@pytest.mark.parametrize("value", [0, 7, 65535])
def test_constant_image_gives_finite_answers(tiny_sam, value):
    p = Predictor(tiny_sam)
    emb = p.set_image(np.full((128, 96), value, np.uint16))
    assert torch.isfinite(emb.features).all()
    r = p.predict(points=[[40, 60]])
    assert np.isfinite(r.low_res_logits).all() and r.masks.shape == (3, 128, 96)


@pytest.mark.parametrize(
    "image, kwargs",
    [
        (np.zeros((64, 80), np.uint8), {}),
        (np.zeros((64, 80), np.float64), {}),
        (np.zeros((64, 80, 3), np.uint8), {}),
        (np.zeros((64, 80, 4), np.uint16), {}),
        (np.zeros((64, 80, 5), np.uint16), {"channel_axis": -1, "channel": 2}),
        (np.zeros((2, 64, 80), np.float32), {"channel_axis": 0, "channel": 1}),
    ],
)
def test_accepted_layouts(tiny_sam, image, kwargs):
    emb = Predictor(tiny_sam).set_image(image, **kwargs)
    assert emb.original_size == (64, 80)
    assert emb.features.shape == (1, 256, 64, 64)


def test_many_channels_without_a_choice(tiny_sam):
    with pytest.raises(ValueError, match="channel"):
        Predictor(tiny_sam).set_image(np.zeros((64, 80, 5), np.uint16), channel_axis=-1)


def test_best_mask_alone_equals_the_best_of_all_masks(predictor):
    r = predictor.predict(points=[[250, 150], [100, 100]], labels=[1, 0])
    best_alone = r.best_mask()
    assert best_alone.shape == (300, 500)
    np.testing.assert_array_equal(best_alone, r.masks[r.best])
    batch = predictor.predict_batch(boxes=[[10, 10, 100, 80], [200, 100, 400, 290]], multimask=True)
    alone = batch.best_mask()
    np.testing.assert_array_equal(alone, batch.masks[np.arange(2), batch.best])


def test_traced_and_eager_predictors_agree(tiny_sam):
    rng = np.random.default_rng(4)
    image = rng.integers(0, 255, (200, 300), dtype=np.uint8)
    traced, eager = Predictor(tiny_sam), Predictor(tiny_sam, traced=False)
    for p in (traced, eager):
        p.set_image(image)
    for kwargs in ({"points": [[20, 30]]}, {"points": [[20, 30], [150, 90]], "labels": [1, 0]},
                   {"box": [10, 10, 120, 90], "multimask": False}, {"points": [[50, 50]], "box": [10, 10, 120, 90]}):
        a, b = traced.predict(**kwargs), eager.predict(**kwargs)
        np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.iou, b.iou, rtol=1e-5, atol=1e-5)


def test_switching_back_to_an_embedding_reuses_its_context(tiny_sam, monkeypatch):
    p = Predictor(tiny_sam)
    rng = np.random.default_rng(5)
    first, second = (p.embed_image(rng.integers(0, 255, (64, 64), dtype=np.uint8)) for _ in range(2))
    calls = []
    compute = p._traced.image_context
    monkeypatch.setattr(p._traced, "image_context", lambda f: calls.append(1) or compute(f))
    a = p.set_embedding(first)
    answer = p.predict(points=[[10, 10]]).low_res_logits
    p.set_embedding(second)
    assert p.set_embedding(first) is a and len(calls) == 2  # the third was remembered
    np.testing.assert_array_equal(p.predict(points=[[10, 10]]).low_res_logits, answer)


def test_warm_up_traces_the_usual_prompts_and_leaves_no_image(tiny_sam):
    p = Predictor(tiny_sam)
    p.warm_up()
    assert len(p._traced._graphs) == 5  # context, point x 3 masks, point x 1, point + mask prompt, box
    with pytest.raises(RuntimeError, match="no image is set"):
        p.predict(points=[[1, 1]])


def test_a_stored_embedding_knows_its_input_side_from_its_features():
    # 16 x 16 features come from a 256-pixel input (the default model's), not SAM's 1024
    emb = ImageEmbedding.from_array(np.zeros((256, 16, 16), np.float32), (100, 200))
    assert emb.input_size == (128, 256)
    assert ImageEmbedding.from_array(np.zeros((256, 64, 64), np.float32), (100, 200)).input_size == (512, 1024)


def test_an_embedding_made_for_another_input_side_is_refused(tiny_sam, predictor):
    emb = predictor.embedding
    wrong = ImageEmbedding(emb.features, (2 * emb.input_size[0], 2 * emb.input_size[1]), emb.original_size)
    with pytest.raises(ValueError, match="model input"):
        Predictor(tiny_sam).set_embedding(wrong)
