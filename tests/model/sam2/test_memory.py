"""SAM 2's memory side piece by piece: rotary attention, memory attention, memory encoder
and the memory selection of tracking, each against a plain restatement of its maths.
(The whole against the official code: test_video_parity.py.)"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from napari_sam.model.sam2.image_encoder import PositionEmbeddingSine
from napari_sam.model.sam2.memory_attention import MemoryAttention, MemoryAttentionLayer, RoPEAttention, axial_rotation
from napari_sam.model.sam2.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from napari_sam.model.sam2.tracking import (
    FrameOutput,
    ObjectMemory,
    _memory_frames,
    select_closest_cond_frames,
    sine_encoding_1d,
)

GRID = 4  # a 4 x 4 token grid
N = GRID * GRID


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 1 else 1 / math.sqrt(p.shape[-1])))
    return module.eval()


def _attention(**kw) -> RoPEAttention:
    args = dict(embedding_dim=32, num_heads=2, kv_in_dim=16, rope_k_repeat=True, feat_sizes=(GRID, GRID))
    args.update(kw)
    return RoPEAttention(**args)


def _memory_attention(num_layers: int = 2) -> MemoryAttention:
    layer = MemoryAttentionLayer(
        activation="relu", cross_attention=_attention(), d_model=32, dim_feedforward=64, dropout=0.1,
        pos_enc_at_attn=False, pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
        self_attention=_attention(kv_in_dim=None, rope_k_repeat=False),
    )
    return _randomise(MemoryAttention(32, True, layer, num_layers))


def test_axial_rotation_turns_columns_then_rows():
    d, theta = 16, 100.0
    table = axial_rotation(d, end_x=GRID, end_y=3, theta=theta)
    assert table.shape == (GRID * 3, d // 2) and table.dtype == torch.complex64
    freqs = [theta ** (-4 * j / d) for j in range(d // 4)]
    for n in range(GRID * 3):
        col, row = n % GRID, n // GRID
        want = [col * f for f in freqs] + [row * f for f in freqs]
        angles = torch.tensor(want, dtype=torch.float64)
        torch.testing.assert_close(table[n].angle().double().cos(), angles.cos(), atol=1e-5, rtol=0)
        torch.testing.assert_close(table[n].angle().double().sin(), angles.sin(), atol=1e-5, rtol=0)
    torch.testing.assert_close(table.abs(), torch.ones(table.shape), atol=1e-6, rtol=0)


def _naive_rope_attention(attn: RoPEAttention, q, k, v, num_excluded: int) -> torch.Tensor:
    """Per-pair rotations by explicit angles, float64, softmax attention per head."""
    dbl = {name: p.double() for name, p in attn.named_parameters()}
    q = q.double() @ dbl["q_proj.weight"].T + dbl["q_proj.bias"]
    k = k.double() @ dbl["k_proj.weight"].T + dbl["k_proj.bias"]
    v = v.double() @ dbl["v_proj.weight"].T + dbl["v_proj.bias"]
    d = attn.head_dim
    freqs = torch.tensor([attn.rope_theta ** (-4 * j / d) for j in range(d // 4)], dtype=torch.float64)

    def rotate(x, count):
        x = x.clone()
        for n in range(count):
            col, row = (n % N) % GRID, (n % N) // GRID
            angles = torch.cat([col * freqs, row * freqs])
            for h in range(attn.num_heads):
                a = x[:, n, h * d:(h + 1) * d:2].clone()
                b = x[:, n, h * d + 1:(h + 1) * d:2].clone()
                x[:, n, h * d:(h + 1) * d:2] = a * angles.cos() - b * angles.sin()
                x[:, n, h * d + 1:(h + 1) * d:2] = a * angles.sin() + b * angles.cos()
        return x

    q, k = rotate(q, q.shape[1]), rotate(k, k.shape[1] - num_excluded)
    heads = []
    for h in range(attn.num_heads):
        s = slice(h * d, (h + 1) * d)
        p = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), dim=-1)
        heads.append(p @ v[..., s])
    return torch.cat(heads, dim=-1) @ dbl["out_proj.weight"].T + dbl["out_proj.bias"]


def test_rope_attention_matches_plain_rotations():
    attn = _randomise(_attention())
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, N, 32, generator=g)
    k, v = torch.randn(2, 3 * N + 4, 16, generator=g), torch.randn(2, 3 * N + 4, 16, generator=g)
    with torch.no_grad():
        ours = attn(q, k, v, num_k_exclude_rope=4)
    torch.testing.assert_close(ours.double(), _naive_rope_attention(attn, q, k, v, 4), atol=1e-5, rtol=1e-5)


def test_rope_attention_refuses_what_it_cannot_rotate():
    with pytest.raises(ValueError, match="divisible by 4"):
        RoPEAttention(embedding_dim=12, num_heads=2)
    attn = _attention(rope_k_repeat=False)
    with pytest.raises(ValueError, match="rotated keys"):
        attn(torch.randn(1, N, 32), torch.randn(1, 2 * N, 16), torch.randn(1, 2 * N, 16))
    with pytest.raises(ValueError, match="square"):
        attn(torch.randn(1, 12, 32), torch.randn(1, 12, 16), torch.randn(1, 12, 16))


def _bank(frames: int, pointers: int, batch: int = 1, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    curr, curr_pos = torch.randn(1, N, 32, generator=g), torch.randn(1, N, 32, generator=g)
    m = frames * N + pointers
    return curr, curr_pos, torch.randn(batch, m, 16, generator=g), torch.randn(batch, m, 16, generator=g)


def test_pointer_tokens_carry_no_rotation():
    attention = _memory_attention()
    curr, curr_pos, memory, pos = _bank(2, 4)
    with torch.no_grad():
        base = attention(curr, memory, curr_pos, pos, num_obj_ptr_tokens=4)
        shuffled = torch.tensor(list(range(2 * N)) + [2 * N + 3, 2 * N + 2, 2 * N + 1, 2 * N])
        same = attention(curr, memory[:, shuffled], curr_pos, pos[:, shuffled], num_obj_ptr_tokens=4)
        spatial = torch.tensor([1, 0] + list(range(2, 2 * N + 4)))
        moved = attention(curr, memory[:, spatial], curr_pos, pos[:, spatial], num_obj_ptr_tokens=4)
    torch.testing.assert_close(same, base, atol=1e-5, rtol=1e-5)
    assert (moved - base).abs().max() > 1e-3, "swapping two spatial memories must change the rotation"


def test_one_frame_serves_every_object():
    attention = _memory_attention()
    curr, curr_pos, memory, pos = _bank(2, 4, batch=3)
    with torch.no_grad():
        together = attention(curr, memory, curr_pos, pos, 4)
        first = attention.first_self_attention(curr, curr_pos)
        reused = attention(curr, memory, curr_pos, pos, 4, first=first)
        alone = torch.cat([attention(curr, memory[i:i + 1], curr_pos, pos[i:i + 1], 4) for i in range(3)])
    assert together.shape == (3, N, 32)
    torch.testing.assert_close(reused, together, atol=0, rtol=0)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_memory_attention_refuses_bad_shapes():
    attention = _memory_attention(1)
    curr, curr_pos, memory, pos = _bank(1, 0)
    with pytest.raises(ValueError, match="memory_pos"):
        attention(curr, memory, curr_pos, pos[:, :-1])
    with pytest.raises(ValueError, match="batch_first"):
        MemoryAttention(32, True, attention.layer(0), 1, batch_first=False)
    with pytest.raises(ValueError, match="activation"):
        MemoryAttentionLayer("tanh", _attention(), 32, 64, 0.0, False, True, False, _attention())


def test_cx_block_is_the_convnext_block():
    block = _randomise(CXBlock(8, kernel_size=3, padding=1))
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        y = block.dwconv(x)
        u = y.mean(1, keepdim=True)
        y = (y - u) / torch.sqrt((y - u).pow(2).mean(1, keepdim=True) + 1e-6)
        y = block.norm.weight[:, None, None] * y + block.norm.bias[:, None, None]
        y = F.gelu(block.pwconv1(y.permute(0, 2, 3, 1)))
        want = x + (block.gamma * block.pwconv2(y)).permute(0, 3, 1, 2)
        torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)


def test_mask_downsampler_keys_and_strides():
    down = MaskDownSampler(embed_dim=8, kernel_size=3, stride=2, padding=1, total_stride=16)
    assert [k for k in down.state_dict() if k.endswith("weight")] == [
        f"encoder.{i}.weight" for i in (0, 1, 3, 4, 6, 7, 9, 10, 12)]
    assert down(torch.randn(2, 1, 64, 64)).shape == (2, 8, 4, 4)
    with pytest.raises(ValueError, match="total_stride"):
        MaskDownSampler(stride=2, total_stride=12)


def test_memory_encoder_shares_the_frame_projection():
    encoder = _randomise(MemoryEncoder(
        out_dim=16, in_dim=32, mask_downsampler=MaskDownSampler(32, 3, 2, 1, 16),
        fuser=Fuser(CXBlock(32), num_layers=2), position_encoding=PositionEmbeddingSine(16)))
    pix, masks = torch.randn(1, 32, 4, 4), torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        shared, pos = encoder(pix, masks)
        expanded, _ = encoder(pix.expand(3, -1, -1, -1), masks)
        x = encoder.pix_feat_proj(pix) + encoder.mask_downsampler(torch.sigmoid(masks))
        want = encoder.out_proj(encoder.fuser(x))
    assert shared.shape == (3, 16, 4, 4) and pos.shape == (3, 16, 4, 4)
    torch.testing.assert_close(shared, expanded, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pos[0], PositionEmbeddingSine(16).encoding(4, 4, torch.device("cpu")))


def test_closest_conditioning_frames():
    cond = {0: "a", 5: "b", 9: "c", 20: "d"}
    assert select_closest_cond_frames(7, cond, -1) == (cond, {})
    assert select_closest_cond_frames(7, cond, 4) == (cond, {})
    selected, rest = select_closest_cond_frames(7, cond, 2)
    assert list(selected) == [5, 9] and sorted(rest) == [0, 20]
    selected, rest = select_closest_cond_frames(7, cond, 3)
    assert list(selected) == [5, 9, 0] and list(rest) == [20]
    selected, _ = select_closest_cond_frames(25, cond, 2)
    assert list(selected) == [20, 9]
    with pytest.raises(ValueError, match="at least 2"):
        select_closest_cond_frames(7, cond, 1)


@pytest.mark.parametrize(("frame", "reverse", "stride", "want"), [
    (10, False, 1, [(1, 4), (2, 5), (3, 6), (4, 7), (5, 8), (6, 9)]),
    (10, True, 1, [(1, 16), (2, 15), (3, 14), (4, 13), (5, 12), (6, 11)]),
    (10, False, 2, [(1, 0), (2, 2), (3, 4), (4, 6), (5, 8), (6, 9)]),
    (11, True, 3, [(1, 27), (2, 24), (3, 21), (4, 18), (5, 15), (6, 12)]),
    (2, False, 1, [(5, 0), (6, 1)]),
])
def test_memory_frames_by_temporal_position(frame, reverse, stride, want):
    model = SimpleNamespace(num_maskmem=7, config=SimpleNamespace(memory_temporal_stride_for_eval=stride))
    outputs = {t: FrameOutput(torch.full((1, 1), float(t)), torch.zeros(1, 1), torch.zeros(1, 1)) for t in range(40)}
    memory = ObjectMemory(cond={}, non_cond={t: o for t, o in outputs.items() if t != frame})
    got = _memory_frames(model, frame, memory, {}, {}, reverse)
    assert [(t_pos, int(out.pred_masks)) for t_pos, out in got] == want


def test_sine_encoding_1d():
    pos = torch.tensor([0.0, 0.5, 1.0])
    enc = sine_encoding_1d(pos, 8)
    dim_t = torch.tensor([10000 ** (2 * (i // 2) / 4) for i in range(4)])
    torch.testing.assert_close(enc, torch.cat([(pos[:, None] / dim_t).sin(), (pos[:, None] / dim_t).cos()], 1))
