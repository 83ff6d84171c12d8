"""Reference outputs of micro-sam's instance segmentation decoder, made with the ORIGINAL code.

micro-sam's light-microscopy and EM checkpoints carry, beside SAM, a UNETR-style
convolutional decoder (``decoder_state``) that turns the image encoder's embedding into
foreground and normalised centre/boundary distance maps. micro-sam builds it with
``micro_sam.instance_segmentation.get_unetr`` (torch-em's ``UNETR`` on SAM's image encoder,
three output channels, sigmoid, no skip connections) and runs it on precomputed embeddings
through ``DecoderAdapter.forward(embedding, input_size, original_size)``. This script builds
exactly that, randomises every decoder parameter and batch-norm statistic (seeded), and
writes one reference set that ``tests/model/test_instance_decoder.py`` compares against.

It is NOT part of the package and never runs in the project's venv: run it in a separate
venv holding the original implementations. The committed sets were made with

    python3 -m venv /work/refvenv
    /work/refvenv/bin/pip install torch==2.13.0 torch-em==0.10.9 segment-anything==1.0 xxhash
    /work/refvenv/bin/pip install --no-deps micro-sam==1.8.14
    /work/refvenv/bin/python scripts/make_instance_decoder_reference.py --seed 0 \
        --out tests/reference/instance_decoder/seed0
    /work/refvenv/bin/python scripts/make_instance_decoder_reference.py --seed 1 --transposed \
        --out tests/reference/instance_decoder/seed1

(Python 3.11, CPU, float32; the exact versions are recorded in each set's ``meta.json``.)
micro-sam is installed without its dependencies because those pull in napari and Qt; what
``micro_sam.instance_segmentation`` imports is all there after the first line.

Two accommodations, neither of which touches a computation that is compared:

- torchvision: torch-em pulls in a torchvision wheel whose compiled operators do not load
  beside torch 2.13 here, and importing it raises. micro-sam, torch-em and segment-anything
  import a few torchvision functions at module level (NMS and box areas for the automatic
  mask generator, image resizing for ``SamPredictor.set_image``, a grid for tensorboard
  images) that the decoder never calls. When ``import torchvision`` fails, this script puts
  stand-ins for exactly those names in ``sys.modules``; each raises if it is ever called, so
  a stand-in cannot silently take part in a result.
- width: ``get_unetr`` builds torch-em's ``UNETR`` with its default decoder width
  (``initial_features=64``: about 10 M parameters, 40 MB). To keep the committed sets small,
  ``--initial-features`` (default 4) binds that one constructor argument of the ``UNETR``
  that ``micro_sam.instance_segmentation`` calls; the modules, the key names, the loading
  (``get_unetr``'s strict per-key check and its detection of transposed convolutions from
  the keys) and the forward pass are micro-sam's and torch-em's own. ``--initial-features 64
  --image-size 1024`` builds the decoder of the released checkpoints at their full width and
  ``vit_b`` geometry (64x64 embeddings, 1024x1024 maps); such a set is large, so keep it out
  of the repository and point ``NAPARI_SAM_REFERENCE_DIR`` at its parent's parent folder
  (``<dir>/instance_decoder/<name>``) to test it.

Layout of a set (all plain tensors, readable with ``torch.load(weights_only=True)``):

- ``decoder.pt``: the decoder state dict, as micro-sam keeps it in a checkpoint's
  ``decoder_state`` and in its registry's ``*_decoder`` files (every ``UNETR`` key that does
  not start with ``encoder``);
- ``data.pt``: ``{"embedding": (2, 256, S/16, S/16)}`` float16 (the decoder gets these
  values exactly, as float32) and, per case, the inputs
  ``{case}/input_size``, ``{case}/original_size`` (rows, cols) and ``{case}/index`` (which
  embeddings), and the original output ``{case}/output`` (b, 3, H, W) float32: foreground,
  centre distances and boundary distances after the sigmoid, at the original size;
- ``meta.json``: seed, configuration, package versions and the cases.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import types
from functools import partial
from pathlib import Path

import torch

# Name -> attributes that micro-sam, torch-em and segment-anything import from torchvision at
# module level (none of which the decoder uses).
_TORCHVISION_NAMES = {
    "torchvision.ops": (),
    "torchvision.ops.boxes": ("batched_nms", "box_area"),
    "torchvision.transforms": (),
    "torchvision.transforms.functional": ("resize", "to_pil_image"),
    "torchvision.utils": ("make_grid",),
}


def _refuse(name):
    def stand_in(*args, **kwargs):
        raise RuntimeError(f"{name} is a stand-in: torchvision does not load here, and the decoder never needs it")

    return stand_in


def _torchvision_stand_ins() -> bool:
    """Import torchvision, or put stand-ins for the names the originals import; True if stood in."""
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:  # a broken install raises RuntimeError from its operator registrations
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]
    sys.modules["torchvision"] = types.ModuleType("torchvision")
    for module_name, attrs in _TORCHVISION_NAMES.items():
        module = types.ModuleType(module_name)
        for attr in attrs:
            setattr(module, attr, _refuse(f"{module_name}.{attr}"))
        sys.modules[module_name] = module
    return True


def _cases(size: int) -> dict[str, dict]:
    """(input_size, original_size, embeddings) per case, scaled with the model input side ``size``.

    ``full`` decodes the whole batch of a square input and shrinks it; ``wide`` crops the
    padding of a landscape input and shrinks; ``upscale`` crops a small input and enlarges it.
    """
    return {
        "full": {"input_size": (size, size), "original_size": (size * 5 // 16,) * 2, "index": (0, 1)},
        "wide": {"input_size": (size * 3 // 4, size), "original_size": (size * 3 // 8, size // 2), "index": (0,)},
        "upscale": {"input_size": (size * 3 // 8, size // 2), "original_size": (size * 15 // 32, size * 5 // 8),
                    "index": (1,)},
    }


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every floating-point parameter and buffer drawn at random, so that every path counts:
    weights scaled by their fan-in, biases and batch-norm shifts small, batch-norm scales and
    variances near one (the statistics are used as they are, in eval mode)."""
    state = module.state_dict()
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if key.endswith("running_var"):
            value.copy_(0.5 + torch.rand(value.shape, generator=generator))
        elif key.endswith("running_mean"):
            value.copy_(0.2 * torch.randn(value.shape, generator=generator))
        elif value.dim() == 1:
            base = 1.0 if key.endswith("weight") else 0.0  # 1-d weights are batch-norm scales
            value.copy_(base + 0.1 * torch.randn(value.shape, generator=generator))
        else:
            fan_in = value[0].numel()
            value.copy_(torch.randn(value.shape, generator=generator) * math.sqrt(2.0 / fan_in))
    module.load_state_dict(state)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="seed of the weights and the embeddings")
    parser.add_argument("--out", type=Path, required=True, help="folder of the set (created; must not hold a set)")
    parser.add_argument("--transposed", action="store_true",
                        help="upsample with transposed convolutions (the layout of older micro-sam checkpoints)")
    parser.add_argument("--initial-features", type=int, default=4,
                        help="decoder width (micro-sam's checkpoints: 64; small keeps the set small)")
    parser.add_argument("--image-size", type=int, default=256,
                        help="side of the SAM input (1024 for vit_b and the released checkpoints)")
    args = parser.parse_args(argv)
    if (args.out / "meta.json").exists():
        parser.error(f"{args.out} already holds a reference set; choose another --out")

    stood_in = _torchvision_stand_ins()
    import micro_sam.instance_segmentation as mis
    from segment_anything.modeling import ImageEncoderViT
    from torch_em.model.unetr import UNETR

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    # The smallest SAM image encoder of the requested input side: the decoder reads only its
    # input side (``img_size``) and its embedding width (the neck's 256 output channels).
    encoder = ImageEncoderViT(
        img_size=args.image_size, patch_size=16, embed_dim=16, depth=1, num_heads=1, mlp_ratio=1.0,
        out_chans=256, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, window_size=0, global_attn_indexes=(0,),
    ).eval()

    mis.UNETR = partial(UNETR, initial_features=args.initial_features)
    # A fresh UNETR as micro-sam trains it (get_unetr without a state), randomised; its
    # non-encoder keys are the decoder_state that micro-sam's trainer saves.
    unetr = mis.UNETR(
        backbone="sam", encoder=encoder, out_channels=3, use_sam_stats=True, final_activation="Sigmoid",
        use_skip_connection=False, resize_input=True, use_conv_transpose=args.transposed,
    )
    _randomise(torch.nn.ModuleDict({k: v for k, v in unetr.named_children() if k != "encoder"}), generator)
    decoder_state = {k: v.clone() for k, v in unetr.state_dict().items() if not k.startswith("encoder")}

    # micro-sam's own loading path: get_unetr detects the upsampling from the keys and checks
    # every key; DecoderAdapter is what its automatic segmentation calls.
    decoder = mis.get_decoder(encoder, decoder_state, device="cpu").eval()
    loaded = decoder.state_dict()
    assert set(loaded) == set(decoder_state) and all(torch.equal(decoder_state[k], loaded[k]) for k in loaded)

    grid = args.image_size // 16
    # Drawn in float16 and decoded in float32: stored at half the size, exactly as used.
    stored = (torch.randn((2, 256, grid, grid), generator=generator) * 0.5).half()
    embedding = stored.float()
    data: dict[str, torch.Tensor] = {"embedding": stored}
    cases = _cases(args.image_size)
    with torch.no_grad():
        for name, case in cases.items():
            output = decoder(embedding[list(case["index"])], case["input_size"], case["original_size"])
            data[f"{name}/output"] = output.contiguous()
            data[f"{name}/input_size"] = torch.tensor(case["input_size"])
            data[f"{name}/original_size"] = torch.tensor(case["original_size"])
            data[f"{name}/index"] = torch.tensor(case["index"])
            print(f"{name}: output {tuple(output.shape)} in [{output.min():.3f}, {output.max():.3f}], "
                  f"mean {output.mean():.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "what": "micro-sam instance segmentation decoder (torch-em UNETR decoder) on precomputed embeddings",
        "seed": args.seed,
        "transposed": args.transposed,
        "initial_features": args.initial_features,
        "image_size": args.image_size,
        "embed_dim": 256,
        "cases": {k: {kk: list(vv) for kk, vv in v.items()} for k, v in cases.items()},
        "versions": {n: _version(n) for n in ("torch", "torch-em", "micro-sam", "segment-anything")},
        "python": sys.version.split()[0],
        "torchvision_stood_in": stood_in,
        "command": " ".join([os.path.basename(sys.argv[0]), *(argv if argv is not None else sys.argv[1:])]),
    }
    torch.save(decoder_state, args.out / "decoder.pt")
    torch.save(data, args.out / "data.pt")
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    print(f"wrote {args.out}: {sizes} ({len(decoder_state)} decoder keys)")


if __name__ == "__main__":
    main()
