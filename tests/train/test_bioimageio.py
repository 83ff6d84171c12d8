"""bioimage.io model packages: export, bioimage.io's own model test, import back, refusals.

Everything runs offline: every HTTP request bioimageio's libraries would make is recorded
(and refused), and the tests assert that there were none.
"""

import copy
import hashlib
import io
import json
import sys
import zipfile

import httpx
import numpy as np
import pytest
import torch
import yaml

from napari_sam.cli import main
from napari_sam.core.models import load_model
from napari_sam.core.predictor import Predictor
from napari_sam.model import SamConfig, TinyViTConfig, build_sam, config_to_dict
from napari_sam.model.bioimageio_model import BoxPromptedSam
from napari_sam.model.checkpoint import read_checkpoint
from napari_sam.train import SegmentationDataset, Trainer, TrainingConfig
from napari_sam.train.bioimageio import export_bioimageio, require_bioimageio, validate_bioimageio
from napari_sam.train.bioimageio_content import describe_training_data
from napari_sam.train.bioimageio_import import _copy_weights, import_bioimageio

OFFICIAL = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


@pytest.fixture(autouse=True, scope="module")
def requests():
    """Every HTTP request made through httpx (bioimageio's client), refused and recorded."""
    made = []
    original = httpx.Client.send

    def refuse(self, request, *args, **kwargs):
        made.append(str(request.url))
        raise httpx.ConnectError("offline test", request=request)

    httpx.Client.send = refuse
    yield made
    httpx.Client.send = original
    assert made == [], f"bioimageio went online: {made}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, nuclei_2d, mini_config):
    """A checkpoint written by the package's trainer: a mini SAM (256-pixel input, which only
    its recorded configuration tells), two steps of decoder training on a piece of the nuclei
    image."""
    image, labels = nuclei_2d
    data = SegmentationDataset.from_arrays([image[208:272, 64:112]], [labels[208:272, 64:112]])
    cfg = TrainingConfig(mode="decoder", steps=2, warmup_steps=0, learning_rate=1e-3, objects_per_image=2,
                         corrective_iterations=0, min_object_pixels=10, seed=1)
    torch.manual_seed(0)
    trainer = Trainer(build_sam(mini_config), data, cfg, device="cpu")
    list(trainer.run())
    return trainer.save(tmp_path_factory.mktemp("trained") / "tuned.pth", optimizer=False)


@pytest.fixture(scope="module")
def package(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("package") / "tuned.zip"
    return export_bioimageio(trained, out, authors=["Ada Tester"], license="CC-BY-4.0",
                             training_data={"license": "CC0-1.0"})


def rdf_of(path):
    # rdf.yaml is YAML 1.2 (bioimageio.spec writes it with ruyaml): PyYAML, a YAML 1.1
    # reader, would take a float such as 5e-05 for a string.
    from ruyaml import YAML

    with zipfile.ZipFile(path) as archive:
        return YAML(typ="safe").load(archive.read("rdf.yaml"))


def rewrite(src, dst, replace):
    """Copy a package, replacing members (name -> bytes, or None to drop it)."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for item in a.infolist():
            data = replace.get(item.filename, a.read(item.filename))
            if data is not None:
                b.writestr(item.filename, data)
        for name, data in replace.items():
            if name not in a.namelist() and data is not None:
                b.writestr(name, data)
    return dst


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# -- export ------------------------------------------------------------------------------------------------
def test_default_model_package_passes_bioimageio_model_test(tmp_path):
    path = export_bioimageio("default", tmp_path / "default.zip")
    passed, lines = validate_bioimageio(path)
    assert passed, "\n".join(lines)
    names = "\n".join(lines)
    assert "Reproduce test outputs from test inputs (pytorch_state_dict)" in names
    assert "batch_size: 2 and size parameter n: 2" in names  # two images, three boxes each
    assert all(line.startswith("passed") for line in lines)

    rdf = rdf_of(path)
    default = load_model("default", device="cpu", dtype="float32")
    assert rdf["license"] == "BSD-3-Clause" and rdf["authors"] == [{"name": "napari-sam developers"}]
    assert rdf["config"]["napari_sam"]["metadata"] == default.metadata
    assert rdf["config"]["napari_sam"]["config"] == config_to_dict(default.config)
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["import_from"] == "napari_sam.model.bioimageio_model"
    assert rdf["cite"][0]["doi"] == "10.48550/arXiv.2304.02643"
    data = rdf["training_data"]
    assert "dsb2018_fluo" in data["description"] and "CC0-1.0" in data["description"]
    assert "research use with citation" in data["description"] and data["license"] is None  # licences differ
    assert [t["id"] for t in rdf["inputs"]] == ["image", "box"]
    assert [t["id"] for t in rdf["outputs"]] == ["masks", "iou"]
    assert rdf["inputs"][0]["preprocessing"][1]["kwargs"]["mean"] == list(default.config.pixel_mean)
    with zipfile.ZipFile(path) as archive:
        state = torch.load(io.BytesIO(archive.read("weights.pt")), weights_only=True)
        readme = archive.read("README.md").decode()
        cover = archive.read("cover.png")
        image = np.load(io.BytesIO(archive.read("test_image.npy")))
        box = np.load(io.BytesIO(archive.read("test_box.npy")))
        masks = np.load(io.BytesIO(archive.read("test_masks.npy")))
    assert set(state) == set(default.state_dict()) and all(k.startswith(OFFICIAL) for k in state)
    assert all(torch.equal(v, default.state_dict()[k]) for k, v in state.items())
    assert "## Validation" in readme and "256 x 256" in readme
    # The default model's stain and size advice is not part of bioimage.io's preprocessing: said in words.
    assert "rgb2hed" in readme and f"about {default.metadata['scale']['object_diameter']:.4g} pixels" in readme
    import imageio.v3 as iio

    assert iio.imread(cover).shape == (256, 512, 3)
    assert image.shape == (1, 3, 256, 256) and box.shape == (1, 3, 4) and masks.shape == (1, 3, 256, 256)

    # The package's forward is SAM's box answer: the predictor of the package gives the same logits
    # (without the mask refiner, which the package does not carry).
    refiner, default.mask_refiner = default.mask_refiner, None
    try:
        predictor = Predictor(default, traced=False)
        predictor.set_model_input(image[0].transpose(1, 2, 0), (256, 256))
        answer = predictor.predict_batch(boxes=box[0], multimask=False, return_logits=True)
    finally:
        default.mask_refiner = refiner
    np.testing.assert_allclose(answer.masks[:, 0], masks[0], atol=2e-3)
    assert (masks[0] > 0).sum(axis=(1, 2)).min() > 20  # the test objects are found

    # the instance decoder (automatic segmentation) and the mask refiner travel as attachments
    # and come back on import, with where the refiner acts
    assert [a["source"] for a in rdf["attachments"]] == ["instance_decoder.pt", "mask_refiner.pt"]
    back = load_model(import_bioimageio(path, tmp_path / "back.pth"), device="cpu", dtype="float32")
    assert back.instance_decoder is not None and back.mask_refiner is not None
    for head in ("instance_decoder", "mask_refiner"):
        theirs = getattr(default, head).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(back, head).state_dict().items())
    assert back.metadata["automatic"] == default.metadata["automatic"]
    assert back.metadata["mask_refiner"]["refine_below_magnification"] == 2.0
    with zipfile.ZipFile(path) as archive:
        refined = torch.load(io.BytesIO(archive.read("mask_refiner.pt")), weights_only=True)
    refined["body.10.bias"] = refined["body.10.bias"] + 1
    with pytest.raises(ValueError, match="(?i)sha256"):
        import_bioimageio(rewrite(path, tmp_path / "tampered.zip", {"mask_refiner.pt": saved(refined)}),
                          tmp_path / "tampered.pth")
    assert not (tmp_path / "tampered.pth").exists()
    with zipfile.ZipFile(path) as archive:
        decoder = torch.load(io.BytesIO(archive.read("instance_decoder.pt")), weights_only=True)
    decoder["out_conv.bias"] = decoder["out_conv.bias"] + 1
    with pytest.raises(ValueError, match="(?i)sha256"):  # altered: refused, by bioimageio's check or ours
        import_bioimageio(rewrite(path, tmp_path / "tampered.zip", {"instance_decoder.pt": saved(decoder)}),
                          tmp_path / "tampered.pth")
    assert not (tmp_path / "tampered.pth").exists()


def test_export_refuses_bad_requests(trained, tmp_path):
    with pytest.raises(ValueError, match="records no licence"):
        export_bioimageio(trained, tmp_path / "a.zip", authors=["A"])
    with pytest.raises(ValueError, match="records no authors"):
        export_bioimageio(trained, tmp_path / "a.zip", license="MIT")
    with pytest.raises(ValueError, match="not an SPDX"):
        export_bioimageio(trained, tmp_path / "a.zip", license="free for all", authors=["A"])
    with pytest.raises(ValueError, match="name 'a/b'"):
        export_bioimageio(trained, tmp_path / "a.zip", license="MIT", authors=["A"], name="a/b")
    with pytest.raises(ValueError, match=r"\.zip"):
        export_bioimageio(trained, tmp_path / "a.pth", license="MIT", authors=["A"])
    (tmp_path / "a.zip").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_bioimageio(trained, tmp_path / "a.zip", license="MIT", authors=["A"])
    assert (tmp_path / "a.zip").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]  # nothing staged is left behind


# -- the round trip ---------------------------------------------------------------------------------------
def test_trained_checkpoint_round_trip(trained, package, nuclei_2d, tmp_path):
    passed, lines = validate_bioimageio(package)
    assert passed, "\n".join(lines)
    rdf = rdf_of(package)
    assert rdf["license"] == "CC-BY-4.0" and rdf["authors"] == [{"name": "Ada Tester"}]
    assert rdf["training_data"]["license"] == "CC0-1.0"
    assert "labelled planes given as arrays" in rdf["training_data"]["description"]

    back = import_bioimageio(package, tmp_path / "back.pth")
    original = load_model(trained, device="cpu", dtype="float32")
    imported = load_model(back, device="cpu", dtype="float32")
    # the metadata come back as they were, with the package's licence and authors added
    assert imported.metadata == {**original.metadata, "license": "CC-BY-4.0", "authors": ["Ada Tester"]}
    assert imported.metadata["training"]["steps"] == 2
    assert imported.config == original.config
    assert imported.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in imported.state_dict().items())

    image = nuclei_2d[0][160:320, 40:200]
    answers = []
    for model in (original, imported):
        predictor = Predictor(model)
        predictor.set_image(image)
        answers.append((predictor.predict(box=[20, 30, 90, 100], multimask=False, return_logits=True),
                        predictor.predict(points=[[60, 70]], multimask=True, return_logits=True)))
    for a, b in zip(*answers):
        np.testing.assert_allclose(a.masks, b.masks, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a.iou, b.iou, rtol=0, atol=1e-6)


def test_box_prompted_sam_takes_any_configuration():
    """The architecture the packages name builds every encoder family from its kwargs and
    loads the official state dict strictly (here a small TinyViT, the vit_t family)."""
    # a last stage 320 wide keeps MobileSAM's stride (16 pixels per embedding cell)
    cfg = SamConfig(TinyViTConfig(embed_dims=(16, 32, 32, 320), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                                  window_sizes=(7, 7, 14, 7), img_size=256), name="tiny-vit-t", image_size=256)
    torch.manual_seed(0)
    sam = build_sam(cfg)
    net = BoxPromptedSam(**json.loads(json.dumps(config_to_dict(cfg))))  # as read back from YAML
    net.load_state_dict(sam.state_dict(), strict=True)
    assert net.config == cfg and not net.training
    image = torch.randn(2, 3, 256, 256)
    box = torch.tensor([[[10.0, 20.0, 120.0, 140.0]], [[30.0, 30.0, 200.0, 90.0]]])
    masks, iou = net(image, box)
    assert masks.shape == (2, 1, 256, 256) and iou.shape == (2, 1)
    with torch.no_grad():
        low, expected = sam.decode(sam.image_encoder(image[1:]), boxes=box[1], multimask_output=False)
    torch.testing.assert_close(iou[1], expected[:, 0])
    with pytest.raises(ValueError, match=r"image must be \(B, 3, 256, 256\)"):
        net(torch.zeros(1, 3, 128, 128), box[:1])


# -- refusals ---------------------------------------------------------------------------------------------
class _Opens:
    """Unpickling this creates a file: the proof that a package's weights were unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_import_refuses_bad_packages(package, tmp_path):
    out = tmp_path / "out.pth"
    rdf = rdf_of(package)

    (tmp_path / "text.zip").write_text("hello")
    with pytest.raises(ValueError, match="not a bioimage.io model package"):
        import_bioimageio(tmp_path / "text.zip", out)
    with pytest.raises(ValueError, match="rdf.yaml|bioimage.io"):
        import_bioimageio(rewrite(package, tmp_path / "bare.zip", {"rdf.yaml": None}), out)

    with zipfile.ZipFile(package) as archive:
        state = torch.load(io.BytesIO(archive.read("weights.pt")), weights_only=True)
    key = "mask_decoder.iou_prediction_head.layers.0.bias"
    state[key] = state[key] + 1
    with pytest.raises(ValueError, match="(?i)sha256 mismatch"):
        import_bioimageio(rewrite(package, tmp_path / "tampered.zip", {"weights.pt": saved(state)}), out)

    with pytest.raises(ValueError, match="failed bioimage.io validation: weights"):
        no_weights = {k: v for k, v in rdf.items() if k != "weights"}
        import_bioimageio(rewrite(package, tmp_path / "none.zip", {"rdf.yaml": yaml.safe_dump(no_weights),
                                                                    "weights.pt": None}), out)
    with pytest.raises(ValueError, match="weights.pt"):
        import_bioimageio(rewrite(package, tmp_path / "missing.zip", {"weights.pt": None}), out)

    def with_weights(name, weights, ours=False):
        data = copy.deepcopy(rdf)
        data["weights"]["pytorch_state_dict"]["sha256"] = hashlib.sha256(weights).hexdigest()
        if not ours:
            del data["config"]["napari_sam"]
        return rewrite(package, tmp_path / name, {"rdf.yaml": yaml.safe_dump(data), "weights.pt": weights})

    with pytest.raises(ValueError, match="not a SAM state dict|no SAM weights"):
        import_bioimageio(with_weights("foreign.zip", saved({"conv.weight": torch.zeros(2, 2)})), out)
    smaller = {k: v for k, v in state.items() if not k.startswith("mask_decoder.iou_prediction_head")}
    with pytest.raises(ValueError, match="missing key"):
        import_bioimageio(with_weights("partial.zip", saved(smaller), ours=True), out)
    marker = tmp_path / "unpickled"
    with pytest.raises(ValueError, match="refused to load|untrusted"):
        import_bioimageio(with_weights("pickle.zip", saved({"x": _Opens(marker)})), out)
    assert not marker.exists() and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".weights-")]  # staged copies removed

    # a foreign package holding a SAM state dict in the official layout imports (configuration inferred)
    with zipfile.ZipFile(package) as archive:
        weights = archive.read("weights.pt")
    import_bioimageio(with_weights("foreign_sam.zip", weights), out)
    assert read_checkpoint(out).metadata == {"license": rdf_of(package)["license"], "authors": ["Ada Tester"]}
    with pytest.raises(FileExistsError, match="overwrite"):
        import_bioimageio(package, out)

    with pytest.raises(ValueError, match="does not match its sha256"):  # our own check, after bioimageio's
        _copy_weights(package, "weights.pt", "0" * 64, tmp_path)

    # a zip bomb: refused before anything is unpacked beside --out
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("weights.pt", bytes(80 << 20))
    with pytest.raises(ValueError, match="weights.pt would unpack to 80 MiB from 0.1 MiB: not model weights"):
        import_bioimageio(bomb, tmp_path / "bomb.pth")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".weights-")]


def test_training_data_description_keeps_paths_private():
    meta = {"training": {"mode": "decoder", "steps": 5, "data": {"source": "folder", "path": "/home/ada/secret/cells",
                                                                   "pairs": 7, "license": "CC-BY-4.0"},
                         "base_model": {"name": "vit_b_lm", "fine_tuned": {"data": {"source": "arrays", "pairs": 2}}}}}
    described = describe_training_data(meta)
    assert "/home/ada" not in described["description"] and "'cells'" in described["description"]
    assert described["licenses"] == ["CC-BY-4.0", "not recorded"]
    assert [d["role"] for d in described["datasets"]] == ["training", "training of the base model vit_b_lm"]
    assert describe_training_data({}) is None


# -- the command line -------------------------------------------------------------------------------------
def test_cli_export_and_import(trained, package, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli.zip"
    assert main(["export", str(trained), "--out", str(out), "--author", "Ada", "--license", "MIT",
                 "--name", "tuned nuclei"]) == 0
    assert rdf_of(out)["name"] == "tuned nuclei" and rdf_of(out)["license"] == "MIT"
    assert main(["import", str(out), "--out", str(tmp_path / "cli.pth")]) == 0
    assert read_checkpoint(tmp_path / "cli.pth").metadata == {**read_checkpoint(trained).metadata, "license": "MIT",
                                                                "authors": ["Ada"]}
    # exported again, the model keeps its licence and authors without being told
    assert main(["export", str(tmp_path / "cli.pth"), "--out", str(tmp_path / "again.zip")]) == 0
    assert rdf_of(tmp_path / "again.zip")["license"] == "MIT"
    assert rdf_of(tmp_path / "again.zip")["authors"] == [{"name": "Ada"}]
    capsys.readouterr()

    def one_line(argv, *words):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err

    one_line(["import", str(out), "--out", str(tmp_path / "cli.pth")], "exists", "--overwrite")
    (tmp_path / "notes.zip").write_text("not a package")
    one_line(["import", str(tmp_path / "notes.zip"), "--out", str(tmp_path / "x.pth")], "not a bioimage.io")
    one_line(["export", str(trained), "--out", str(tmp_path / "y.zip"), "--author", "Ada"], "records no licence")
    one_line(["export", "no-such-model", "--out", str(tmp_path / "y.zip")], "no-such-model")
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)
    with pytest.raises(ImportError, match="pip install"):
        require_bioimageio()
    one_line(["import", str(package), "--out", str(tmp_path / "z.pth")], "pip install", "bioimageio")


def test_test_sample_from_a_user_image(nuclei_2d, mini_config):
    """A non-square uint16 plane: resized like SAM (longest side to the input), boxes scaled with
    it, padded with the pixel mean; without boxes, Otsu's largest objects are the prompts."""
    from napari_sam.core.preprocess import Normalization, prepare_plane
    from napari_sam.train.bioimageio_content import make_cover, make_test_sample, normalize_input

    torch.manual_seed(0)
    net = BoxPromptedSam(**config_to_dict(mini_config))
    plane = nuclei_2d[0][:300, :512]  # uint16, 300 x 512 -> 150 x 256
    sample = make_test_sample(net, Normalization(), plane, [[100, 50, 200, 150]])
    assert sample.input_size == (150, 256) and sample.image.shape == (1, 3, 256, 256)
    np.testing.assert_allclose(sample.box, [[[50, 25, 100, 75]]])
    padding = np.broadcast_to(np.reshape(mini_config.pixel_mean, (3, 1, 1)), (3, 106, 256))
    np.testing.assert_allclose(sample.image[0, :, 150:, :], padding, rtol=1e-6)
    expected, _ = prepare_plane(plane, Normalization(), long_side=256)  # the predictor's own preprocessing
    np.testing.assert_array_equal(sample.image[0, :, :150], expected[0].numpy())
    with torch.no_grad():
        masks, iou = net(torch.from_numpy(normalize_input(sample.image, mini_config.pixel_mean, mini_config.pixel_std)),
                         torch.from_numpy(sample.box))
    np.testing.assert_array_equal(masks.numpy(), sample.masks)
    assert make_cover(sample).shape == (256, 512, 3)

    found = make_test_sample(net, Normalization(), plane)
    labels = nuclei_2d[1][:300, :512]
    assert found.box.shape == (1, 3, 4)
    for x0, y0, x1, y1 in found.box[0] * 2:  # back in plane pixels: each box holds labelled nuclei
        assert labels[int(y0):int(y1) + 1, int(x0):int(x1) + 1].any()
    with pytest.raises(ValueError, match=r"test boxes must be \(N, 4\)"):
        make_test_sample(net, Normalization(), plane, [[1, 2, 3]])
