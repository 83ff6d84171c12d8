"""The oneDNN route for matrix products gives F.linear's numbers, keeps out of autograd,
and steps aside when switched off."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from napari_sam.model import matmul
from napari_sam.model.common import MLPBlock

needs_onednn = pytest.mark.skipif(not matmul.available(), reason="this torch build has no oneDNN linear kernel")


def _count_onednn_calls(monkeypatch):
    monkeypatch.setattr(matmul, "enabled", True)  # whatever NAPARI_SAM_ONEDNN says
    calls = []
    real = matmul._kernel

    def counting(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(matmul, "_kernel", counting)
    return calls


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
@pytest.mark.parametrize("shape", [(4096, 96), (2, 32, 32, 96)])
def test_linear_matches_aten(monkeypatch, activation, shape):
    calls = _count_onednn_calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(*shape, generator=g), torch.randn(384, 96, generator=g), torch.randn(384, generator=g)
    with torch.inference_mode():
        got = matmul.linear(x, w, b, activation)
    want = F.linear(x, w, b)
    want = {None: want, "gelu": F.gelu(want), "relu": F.relu(want)}[activation]
    assert calls == [activation or "none"]  # large enough to go through oneDNN
    assert got.shape == want.shape == (*shape[:-1], 384)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_matmul_nt_takes_strided_right_side(monkeypatch):
    calls = _count_onednn_calls(monkeypatch)
    a, keys = torch.randn(56, 4096), torch.randn(4096, 256)
    with torch.inference_mode():
        got = matmul.matmul_nt(a, keys.t())  # a @ keys, the right side a transposed view
    assert calls == ["none"]
    torch.testing.assert_close(got, a @ keys, rtol=1e-5, atol=1e-3)


def test_small_products_gradients_and_switch_use_aten(monkeypatch):
    calls = _count_onednn_calls(monkeypatch)
    with torch.inference_mode():
        matmul.linear(torch.randn(7, 256), torch.randn(256, 256))  # a few prompt tokens
    # training: the oneDNN kernel has no backward, so autograd must see F.linear
    mlp = MLPBlock(64, 512)
    x = torch.randn(2048, 64, requires_grad=True)
    mlp(x).square().sum().backward()
    ref = x.detach().clone().requires_grad_()
    mlp.lin2(F.gelu(mlp.lin1(ref))).square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)
    monkeypatch.setattr(matmul, "enabled", False)
    with torch.inference_mode():
        matmul.linear(torch.randn(4096, 256), torch.randn(256, 256), activation="gelu")
    assert calls == []


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        matmul.linear(torch.randn(2, 3), torch.randn(4, 3), activation="tanh")


@needs_onednn
def test_traced_graph_records_the_route(monkeypatch):
    """A traced decoder calls the kernel from its graph (no Python in between)."""
    monkeypatch.setattr(matmul, "enabled", True)
    mlp = MLPBlock(256, 2048, torch.nn.ReLU)
    x = torch.randn(64, 256)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes become constants, as intended
        warnings.simplefilter("ignore", DeprecationWarning)
        graph = torch.jit.trace(mlp, (x,), check_trace=False)
        eager = mlp(x)
    assert "mkldnn::_linear_pointwise" in str(graph.inlined_graph)
    calls = _count_onednn_calls(monkeypatch)
    with torch.inference_mode():
        torch.testing.assert_close(graph(x), eager)
    assert calls == []  # the graph does not come back to Python


def test_encoder_and_decoder_agree_across_routes(tiny_sam, monkeypatch):
    torch.manual_seed(1)
    x = torch.rand(1, 3, 1024, 1024) * 255
    coords, labels = torch.tensor([[[300.0, 400.0]]]), torch.ones(1, 1, dtype=torch.long)
    out = {}
    for route in (True, False):
        monkeypatch.setattr(matmul, "enabled", route)
        with torch.inference_mode():
            emb = tiny_sam.embed(x)
            low, iou = tiny_sam.decode(emb, coords, labels, context=tiny_sam.image_context(emb))
        out[route] = emb, low, iou
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_autocast_and_a_trainable_bias_keep_to_aten(monkeypatch):
    calls = _count_onednn_calls(monkeypatch)
    x, w, b = torch.randn(4096, 256), torch.randn(256, 256), torch.randn(256)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = matmul.linear(x, w, b, "gelu")  # autocast decides the precision, as for F.linear
        assert got.dtype == F.linear(x, w, b).dtype == torch.bfloat16
    bias = b.clone().requires_grad_()
    matmul.linear(x, w, bias).sum().backward()  # frozen weights, trainable bias
    assert calls == []
    torch.testing.assert_close(bias.grad, torch.full((256,), 4096.0))


def test_probe_leaves_the_random_stream_alone(monkeypatch):
    monkeypatch.setattr(matmul, "_working", None)
    torch.manual_seed(5)
    matmul.available()
    after_probe = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_probe)


def test_activation_names_of_modules():
    assert matmul.activation_of(torch.nn.GELU()) == "gelu"
    assert matmul.activation_of(torch.nn.GELU(approximate="tanh")) is None  # not what oneDNN's "gelu" computes
    assert matmul.activation_of(torch.nn.ReLU()) == "relu"
    assert matmul.activation_of(torch.nn.SiLU()) is None
    y = torch.randn(5)
    want = F.gelu(y)
    with torch.no_grad():
        assert matmul.activate(y, "gelu") is y  # in place: no second tensor
    torch.testing.assert_close(y, want)
