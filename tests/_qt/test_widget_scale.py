import numpy as np


def test_the_magnification_is_the_models_advice_unless_chosen(make_napari_viewer, shared_dir, monkeypatch, qtbot):
    import tifffile

    monkeypatch.delenv("NAPARI_SAM_MODEL", raising=False)
    from napari_sam._qt.widget import SamWidget

    # 9-pixel nuclei: the default model asks for about 30, so the plane is enlarged 3x
    small = tifffile.imread(shared_dir / "data" / "stardist_bundled" / "img2d_small.tif")
    viewer = make_napari_viewer()
    viewer.add_image(small, name="small nuclei")
    w = SamWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert w.model.value == "default" and w.magnification.value == "auto"
    w.start_session()
    qtbot.waitUntil(lambda: w.session is not None, timeout=60000)
    emb = w.session.annotator.embeddings
    assert emb.magnification == 3.0 and "default at 3x" in w.status.value
    assert emb.grid.tile + 2 * emb.grid.halo == 88  # 256 / 3, rounded to 8: tiles of 88 pixels
    assert np.prod(emb.grid.grid_shape) > 1

    w.magnification.value = "1"  # the user overrules it: a new session embeds the plane whole
    started = w.session
    w.start_session()
    qtbot.waitUntil(lambda: w.session is not started, timeout=60000)
    emb = w.session.annotator.embeddings
    assert emb.magnification == 1.0 and emb.grid.grid_shape == (1, 1) and "default at 1x" in w.status.value


def test_he_is_read_as_its_stain_unless_the_colours_are_chosen(make_napari_viewer, shared_dir, monkeypatch, qtbot):
    import tifffile

    monkeypatch.delenv("NAPARI_SAM_MODEL", raising=False)
    from napari_sam._qt.widget import SamWidget

    tile = tifffile.imread(shared_dir / "data" / "cryonuseg_he_examples" / "images" / "TCGA-S4-A8RO.tif")
    viewer = make_napari_viewer()
    grey = viewer.add_image(tile[..., 0], name="grey")
    w = SamWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert w.rgb_reading.native.isHidden()  # offered for RGB layers only
    viewer.layers.remove(grey)
    viewer.add_image(tile, name="H&E", rgb=True)
    w.image.reset_choices()
    w.image.value = viewer.layers["H&E"]
    assert not w.rgb_reading.native.isHidden() and w.rgb_reading.value == "model's advice"
    w.start_session()
    qtbot.waitUntil(lambda: w.session is not None, timeout=60000)
    source = w.session.annotator.embeddings.source
    assert source.stain == "haematoxylin" and "haematoxylin stain" in w.status.value
    assert source.read(0).shape == tile.shape[:2]

    w.rgb_reading.value = "colours"  # the user overrules it: the next session reads RGB
    started = w.session
    w.start_session()
    qtbot.waitUntil(lambda: w.session is not started, timeout=60000)
    source = w.session.annotator.embeddings.source
    assert source.stain is None and source.channel == "rgb" and "haematoxylin" not in w.status.value
    assert source.read(0).shape == tile.shape
