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
