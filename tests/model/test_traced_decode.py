"""Traced decoding gives the eager decoder's numbers, shares its weights and steps aside
when tracing fails."""

import warnings

import pytest
import torch

from napari_sam.model.traced_decode import TracedDecode


@pytest.fixture(scope="module")
def context(tiny_sam):
    torch.manual_seed(3)
    grid = tiny_sam.config.embedding_size
    with torch.inference_mode():
        return tiny_sam.image_context(torch.randn(1, tiny_sam.config.prompt_embed_dim, grid, grid))


def _prompts(batch, n, boxes):
    g = torch.Generator().manual_seed(10 * batch + n)
    coords = None if n == 0 else torch.rand(batch, n, 2, generator=g) * 1024
    labels = None if n == 0 else torch.randint(0, 2, (batch, n), generator=g)
    box = torch.tensor([[100.0, 200.0, 400.0, 500.0]] * batch) if boxes else None
    return coords, labels, box


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("boxes", [False, True])
def test_traced_graphs_match_eager_for_any_number_of_points(tiny_sam, context, multimask, boxes):
    traced = TracedDecode(tiny_sam)
    counts = [0, 1, 2, 5] if boxes else [1, 2, 5]  # one graph per kind, however many points
    with torch.inference_mode():
        for batch in (1, 2):
            for n in counts:
                coords, labels, box = _prompts(batch, n, boxes)
                low, iou = traced(coords, labels, box, multimask, context)
                ref_low, ref_iou = tiny_sam.decode(None, coords, labels, box, None, multimask, context=context)
                assert low.shape == ref_low.shape == (batch, 3 if multimask else 1, 256, 256)
                torch.testing.assert_close(low, ref_low, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(iou, ref_iou, rtol=1e-5, atol=1e-5)
    assert traced.enabled
    # single prompt sets only (batches run eagerly), with and without points beside a box
    assert len(traced._graphs) == (2 if boxes else 1) and all(key[0] == 1 for key in traced._graphs)


def test_traced_image_context_matches(tiny_sam):
    traced = TracedDecode(tiny_sam)
    grid = tiny_sam.config.embedding_size
    emb = torch.randn(1, tiny_sam.config.prompt_embed_dim, grid, grid)
    with torch.inference_mode():
        a, b = traced.image_context(emb), tiny_sam.image_context(emb)
    for field in ("keys", "key_pe", "keys_pe", "t2i_k", "t2i_v", "i2t_q"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field))


def test_graphs_follow_weights_changed_in_place(tiny_checkpoint, context):
    from napari_sam.core.models import load_model

    sam = load_model(str(tiny_checkpoint))
    traced = TracedDecode(sam)
    coords, labels, _ = _prompts(1, 2, False)
    with torch.inference_mode():
        before, _ = traced(coords, labels, None, True, context)
    with torch.no_grad():
        sam.mask_decoder.iou_token.weight.mul_(3.0)  # as an optimiser step would
    with torch.inference_mode():
        after, _ = traced(coords, labels, None, True, context)
        eager, _ = sam.decode(None, coords, labels, None, None, True, context=context)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, eager, rtol=1e-5, atol=1e-5)


def test_a_decoder_that_cannot_be_traced_is_run_eagerly(tiny_sam, context, monkeypatch):
    def refuse(*_a, **_k):
        raise RuntimeError("no tracing here")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    traced = TracedDecode(tiny_sam)
    coords, labels, _ = _prompts(1, 1, False)
    with pytest.warns(RuntimeWarning, match="decoding eagerly.*no tracing here"), torch.inference_mode():
        low, _ = traced(coords, labels, None, True, context)
    assert not traced.enabled
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error")  # warned once, then quietly eager
        again, _ = traced(coords, labels, None, True, context)
        ref, _ = tiny_sam.decode(None, coords, labels, None, None, True, context=context)
    torch.testing.assert_close(low, ref)
    torch.testing.assert_close(again, ref)


def test_a_click_with_the_previous_answer_as_mask_prompt_is_traced_too(tiny_sam, context):
    grid = tiny_sam.config.embedding_size
    torch.manual_seed(3)
    embedding = torch.randn(1, tiny_sam.config.prompt_embed_dim, grid, grid)
    with torch.inference_mode():
        ctx = tiny_sam.image_context(embedding)
    traced = TracedDecode(tiny_sam)
    mask = torch.randn(1, 1, 4 * grid, 4 * grid)
    with torch.inference_mode():
        for n in (1, 3):
            coords, labels, _ = _prompts(1, n, False)
            low, iou = traced(coords, labels, None, False, ctx, mask, embedding)
            ref_low, ref_iou = tiny_sam.decode(embedding, coords, labels, None, mask, False)
            torch.testing.assert_close(low, ref_low, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(iou, ref_iou, rtol=1e-5, atol=1e-5)
    assert [k[1:5] for k in traced._graphs] == [(True, False, True, False)]  # one graph, any point count
    with pytest.raises(ValueError, match="needs the embedding"):
        traced(coords, labels, None, False, ctx, mask)
