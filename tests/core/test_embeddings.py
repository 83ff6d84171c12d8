"""Embeddings of whole images: tiles, cache reuse and invalidation, resume, damage,
dask and distributed computation. The model is the tiny random SAM: the checks are on
values, which must be exactly those of the 2D predictor on the same pixels."""

import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from napari_sam.core.embedding_store import CacheMismatchError, describe_cache
from napari_sam.core.embeddings import Embeddings, default_cache_path
from napari_sam.core.image_source import ImageSource
from napari_sam.core.masks import drop_fragments
from napari_sam.core.models import load_model
from napari_sam.core.predictor import Predictor
from napari_sam.core.preprocess import Normalization
from napari_sam.core.prompts import Prompt


@pytest.fixture(scope="module")
def big_plane(nuclei_2d):
    """A 700 x 900 uint16 plane made of real nuclei: larger than a 256-pixel tile grid."""
    img = nuclei_2d[0].astype(np.uint16) * 100 + 50
    return np.pad(img, ((0, 188), (0, 388)), mode="reflect")


@pytest.fixture(scope="module")
def volume_zarr(tmp_path_factory, nuclei_3d):
    """Real 3D nuclei (8 planes) in a Zarr v3 array chunked as microscopy files are."""
    path = tmp_path_factory.mktemp("vol") / "nuclei.zarr"
    data = np.repeat(np.repeat(nuclei_3d[0][::12], 3, axis=1), 3, axis=2).astype(np.uint16) * 50  # (9, 300, 300)
    z = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(1, 128, 128))
    z[...] = data
    return path, data


def _count_computes(monkeypatch, emb):
    calls = []
    original = emb._compute

    def counting(entry):
        calls.append(entry)
        return original(entry)

    monkeypatch.setattr(emb, "_compute", counting)
    return calls


def test_one_tile_plane_matches_the_2d_predictor(tiny_model, nuclei_2d):
    image = nuclei_2d[0]
    emb = Embeddings(image, tiny_model, cache=False)
    assert len(emb.grid) == 1 and emb.limits == tuple(ImageSource(image).intensity_limits())
    predictor = Predictor(tiny_model)
    reference = predictor.set_image(image, limits=emb.limits)
    assert torch.equal(emb.embedding_for(0).features, reference.features)
    mask = predictor.predict(points=[[200, 310]]).best_mask()
    result = emb.segment(0, Prompt.make(points=[[200, 310]]))
    # the predictor's mask, less its detached specks (the random model leaves many)
    assert np.array_equal(result.to_full(image.shape), drop_fragments(mask, [[200, 310]]))


def test_every_tile_is_the_embedding_of_its_region_with_shared_limits(tiny_model, big_plane):
    emb = Embeddings(big_plane, tiny_model, cache=False, tile=256, halo=32)
    assert emb.grid.grid_shape == (3, 4)
    predictor = Predictor(tiny_model)
    for index in [(0, 0), (1, 2), (2, 3)]:
        tile = emb.grid[index]
        expected = predictor.embed_image(big_plane[tile.outer_slices], limits=emb.limits)
        got = emb.embedding_for(0, index)
        assert got.original_size == tile.shape and torch.equal(got.features, expected.features)
    # a dim corner tile is not stretched by its own percentiles: all tiles share the limits
    own = predictor.embed_image(big_plane[emb.grid[0, 0].outer_slices])
    assert not torch.equal(own.features, emb.embedding_for(0, (0, 0)).features)


def test_segment_places_tile_masks_in_plane_coordinates(tiny_model, big_plane):
    emb = Embeddings(big_plane, tiny_model, cache=False, tile=256, halo=32)
    tile = emb.grid[1, 2]
    x, y = 600.5, 400.5
    result = emb.segment(0, Prompt.make(points=[[x, y]]), max_tiles=1)
    predictor = Predictor(tiny_model)
    predictor.set_embedding(emb.embedding_for(0, (1, 2)))
    local = predictor.predict(points=[[x - tile.outer[2], y - tile.outer[0]]]).best_mask()
    expected = np.zeros(big_plane.shape, bool)
    expected[tile.outer_slices] = local
    inner = np.zeros_like(expected)
    inner[tile.inner[0] : tile.inner[1], tile.inner[2] : tile.inner[3]] = True
    assert result.tiles[0] == (1, 2)
    assert np.array_equal(result.to_full(big_plane.shape), drop_fragments(expected & inner, [[x, y]]))


def test_a_correction_is_answered_with_the_previous_logits_as_mask_prompt(tiny_model, big_plane):
    emb = Embeddings(big_plane, tiny_model, cache=False, tile=256, halo=32)
    tile = emb.grid[1, 2]
    pts = np.array([[600.5, 400.5], [610.5, 380.5]])
    first = emb.segment(0, Prompt.make(points=pts[:1]), max_tiles=1)
    assert first.logits.shape == (256, 256)
    refined = emb.segment(0, Prompt.make(points=pts, labels=[1, 0], previous=first), max_tiles=1)
    local = pts - (tile.outer[2], tile.outer[0])
    predictor = Predictor(tiny_model)
    predictor.set_embedding(emb.embedding_for(0, (1, 2)))
    # The single mask, or (where it leaves a click on the wrong side) one of the three
    # asked again: all answered with the first answer's logits as mask prompt.
    single = predictor.predict(points=local, labels=[1, 0], mask_input=first.logits, multimask=False)
    three = predictor.predict(points=local, labels=[1, 0], mask_input=first.logits, multimask=True)
    assert any(np.array_equal(refined.logits, k) for k in [*single.low_res_logits, *three.low_res_logits])
    plain = emb.segment(0, Prompt.make(points=pts, labels=[1, 0]), max_tiles=1)
    assert not np.array_equal(plain.logits, refined.logits)


def test_dask_zarr_and_numpy_inputs_give_the_same_embeddings(tiny_model, volume_zarr):
    path, data = volume_zarr
    embs = [
        Embeddings(data, tiny_model, cache=False, axes="ZYX", tile=200, halo=25),
        Embeddings(zarr.open_array(str(path), mode="r"), tiny_model, cache=False, axes="ZYX", tile=200, halo=25),
        Embeddings(da.from_zarr(str(path)), tiny_model, cache=False, axes="ZYX", tile=200, halo=25),
    ]
    assert embs[0].limits == embs[1].limits == embs[2].limits
    ref = embs[0].embedding_for(4, (1, 0)).features
    for emb in embs[1:]:
        assert torch.equal(emb.embedding_for(4, (1, 0)).features, ref)


def test_embedding_on_demand_computes_only_what_is_asked(tiny_model, volume_zarr, tmp_path, monkeypatch):
    path, _ = volume_zarr
    emb = Embeddings(zarr.open_array(str(path), mode="r"), tiny_model, tmp_path / "c.zarr", axes="ZYX", tile=200,
                     halo=25)
    calls = _count_computes(monkeypatch, emb)
    emb.embedding_for(6, (0, 1))
    emb.embedding_for(6, (0, 1))
    assert calls == [(6, 0, 1)] and emb.store.present().sum() == 1
    assert emb.is_cached(6, (0, 1)) and not emb.is_cached(6, (1, 1)) and not emb.plane_ready(6)
    # two threads asking for the same tile at once compute it once
    threads = [threading.Thread(target=emb.embedding_for, args=(2, (1, 1))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls.count((2, 1, 1)) == 1


def test_a_complete_plane_is_known_without_reading_the_cache_again(tiny_model, volume_zarr, tmp_path):
    path, _ = volume_zarr
    emb = Embeddings(zarr.open_array(str(path), mode="r"), tiny_model, tmp_path / "c.zarr", axes="ZYX", tile=200,
                     halo=25)
    assert not emb.plane_ready(4)
    # another process (a dask worker, the CLI) fills the cache: a negative is asked again
    other = Embeddings(zarr.open_array(str(path), mode="r"), tiny_model, tmp_path / "c.zarr", axes="ZYX", tile=200,
                       halo=25)
    other.compute_all(planes=[4], progress=False)
    assert emb.plane_ready(4)

    class Unreadable:
        def __getitem__(self, _):
            raise AssertionError("the cache was read again")

    emb.store.checksums = Unreadable()  # the widget asks on every click, from the GUI thread
    assert emb.plane_ready(4) and emb.is_cached(4, (1, 0))


def test_a_second_session_reuses_the_cache(tiny_model, volume_zarr, tmp_path, monkeypatch):
    path, _ = volume_zarr
    cache = tmp_path / "c.zarr"
    first = Embeddings(zarr.open_array(str(path), mode="r"), tiny_model, cache, axes="ZYX", tile=200, halo=25)
    first.compute_all(planes=[0, 3], progress=False)
    again = Embeddings(zarr.open_array(str(path), mode="r"), tiny_model, cache, axes="ZYX", tile=200, halo=25)
    calls = _count_computes(monkeypatch, again)
    progress = list(again.precompute(planes=[0, 3]))
    assert [(p.done, p.total) for p in progress] == [(8, 8)] and calls == []
    assert torch.equal(again.embedding_for(3, (1, 1)).features, first.embedding_for(3, (1, 1)).features)
    assert calls == []


def _variants(tmp_path, tiny_model, data):
    """Each changes one field of the signature."""
    torch.manual_seed(1)
    from napari_sam.model import build_sam
    from tests.conftest import TINY

    other_ckpt = tmp_path / "other.pth"
    torch.save(build_sam(TINY).state_dict(), other_ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bfloat16 on a CPU without it
        bf16 = load_model(tiny_model.source.path, dtype="bfloat16")
    changed = data.copy()
    changed[0, 0, 0] += 1
    two_channels = np.stack([data, data // 2], axis=1)  # (Z, C, Y, X)
    return {
        "checkpoint": dict(model=load_model(other_ckpt)),
        "dtype": dict(model=bf16),
        "normalization": dict(normalization=Normalization(high=99.0)),
        "tile": dict(tile=150),
        "halo": dict(halo=10),
        "image_fingerprint": dict(image=changed),
        "shape": dict(image=data[:4]),
        "dtype_in": dict(image=data.astype(np.int32)),
        "axes": dict(axes="TYX"),
        "channel": dict(image=two_channels, axes="ZCYX", channel=1),
        "storage": dict(storage="float16"),
    }


def test_a_cache_computed_differently_is_never_used_silently(tiny_model, volume_zarr, tmp_path):
    _, data = volume_zarr
    cache = tmp_path / "c.zarr"
    base = dict(image=data, model=tiny_model, axes="ZYX", tile=200, halo=25)

    def open_(on_mismatch, **over):
        kw = base | over
        return Embeddings(kw.pop("image"), kw.pop("model"), cache, on_mismatch=on_mismatch, **kw)

    open_("error").embedding_for(0)
    for field, over in _variants(tmp_path, tiny_model, data).items():
        with pytest.raises(CacheMismatchError, match=f"{field}: "):
            open_("error", **over)
        with pytest.warns(UserWarning, match=f"{field}: "):
            fresh = open_("keep", **over)
        assert not fresh.store.present().any(), field
    assert open_("error").store.present().sum() == 1  # the original entries are intact


def test_resume_after_cancel_and_after_a_torn_write(tiny_model, volume_zarr, tmp_path, monkeypatch):
    path, _ = volume_zarr
    source = zarr.open_array(str(path), mode="r")
    clean = Embeddings(source, tiny_model, tmp_path / "clean.zarr", axes="ZYX", tile=200, halo=25)
    clean.compute_all(planes=[1, 2], progress=False)

    cache = tmp_path / "c.zarr"
    emb = Embeddings(source, tiny_model, cache, axes="ZYX", tile=200, halo=25)
    run = emb.precompute(planes=[1, 2])
    assert next(run).done == 0
    for _ in range(3):
        next(run)
    run.close()  # the user pressed cancel
    assert emb.store.present().sum() == 3
    # a crash between writing an entry's features and its checksum
    emb.store.features[2, 1, 0] = np.ones((256, 64, 64), np.float32)

    resumed = Embeddings(source, tiny_model, cache, axes="ZYX", tile=200, halo=25)
    calls = _count_computes(monkeypatch, resumed)
    progress = list(resumed.precompute(planes=[1, 2]))
    assert progress[0].done == 3 and progress[-1].done == progress[-1].total == 8
    assert len(calls) == 5 and (2, 1, 0) in calls
    assert np.array_equal(np.asarray(resumed.store.features[1:3]), np.asarray(clean.store.features[1:3]))


def test_resume_after_the_process_is_killed(tiny_checkpoint, volume_zarr, tmp_path):
    path, _ = volume_zarr
    cache = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "napari_sam.cli", "embed", str(path), "--model", str(tiny_checkpoint),
           "--dtype", "float32", "--axes", "ZYX", "--tile", "100", "--halo", "10", "--out", str(cache)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = describe_cache(cache) if (cache / "zarr.json").exists() else []
            if info and info[0]["present"] >= 5:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    present = describe_cache(cache)[0]["present"]
    assert 5 <= present < 81  # killed mid-run: 9 planes x 3 x 3 tiles
    model = load_model(tiny_checkpoint, dtype="float32")  # as the killed run's --dtype
    resumed = Embeddings(zarr.open_array(str(path), mode="r"), model, cache, axes="ZYX", tile=100, halo=10)
    first = next(resumed.precompute())
    assert first.done >= present - 1  # at most the entry being written was lost
    resumed.compute_all(progress=False)
    fresh = Embeddings(zarr.open_array(str(path), mode="r"), model, cache=False, axes="ZYX", tile=100, halo=10)
    for entry in [(0, 0, 0), (4, 1, 2), (8, 2, 2)]:
        np.testing.assert_allclose(
            resumed.embedding_for(entry[0], entry[1:]).features, fresh.embedding_for(entry[0], entry[1:]).features,
            atol=1e-5
        )


def test_a_damaged_entry_is_recomputed(tiny_model, volume_zarr, tmp_path, monkeypatch):
    path, _ = volume_zarr
    cache = tmp_path / "c.zarr"
    emb = Embeddings(zarr.open_array(str(path), mode="r"), tiny_model, cache, axes="ZYX", tile=200, halo=25)
    good = emb.embedding_for(5, (1, 1)).features.clone()
    chunk = cache / emb.store.key / "features" / "c" / "5" / "1" / "1" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-100])  # a torn file
    again = Embeddings(zarr.open_array(str(path), mode="r"), tiny_model, cache, axes="ZYX", tile=200, halo=25)
    calls = _count_computes(monkeypatch, again)
    assert torch.equal(again.embedding_for(5, (1, 1)).features, good)
    assert calls == [(5, 1, 1)] and again.store.read((5, 1, 1)) is not None



def test_a_damaged_checksum_chunk_is_an_absent_tile_computed_again_not_a_crash(tiny_model, volume_zarr, tmp_path,
                                                                                monkeypatch):
    path, _ = volume_zarr
    cache = tmp_path / "c.zarr"
    emb = Embeddings(zarr.open_array(str(path), mode="r"), tiny_model, cache, axes="ZYX", tile=200, halo=25)
    emb.compute_all(planes=[5], progress=False)
    good = emb.embedding_for(5, (1, 1)).features.clone()
    (cache / emb.store.key / "checksums" / "c" / "5" / "1" / "1").write_bytes(b"\xff\xff garbage")
    again = Embeddings(zarr.open_array(str(path), mode="r"), tiny_model, cache, axes="ZYX", tile=200, halo=25)
    assert not again.is_cached(5, (1, 1)) and again.is_cached(5, (0, 0)) and not again.plane_ready(5)
    calls = _count_computes(monkeypatch, again)
    assert again.compute_all(planes=[5], progress=False) == len(again.entries([5]))
    assert calls == [(5, 1, 1)] and torch.equal(again.embedding_for(5, (1, 1)).features, good)
    assert again.plane_ready(5) and again.store.verify().clean


def test_a_cache_that_cannot_be_written_leaves_the_session_in_memory_with_one_warning(tiny_model, volume_zarr,
                                                                                      tmp_path, monkeypatch):
    import errno

    from napari_sam.core.embedding_store import EmbeddingStore

    path, _ = volume_zarr
    emb = Embeddings(zarr.open_array(str(path), mode="r"), tiny_model, tmp_path / "c.zarr", axes="ZYX", tile=200,
                     halo=25)
    on_disk, tried = emb.store, []

    def refused(entry, features):  # a cache made read-only, or a full disk
        tried.append(entry)
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "c.zarr" / "features"))

    monkeypatch.setattr(on_disk, "write", refused)
    with pytest.warns(UserWarning, match=r"cannot be written \(Permission denied\): tiles computed now are kept in "
                                         r"memory only"):
        first = emb.embedding_for(3, (0, 0))
    assert emb.store is not on_disk and emb.store.path is None  # a store in memory from now on
    second = emb.embedding_for(4, (0, 0))  # no second warning, no second try
    assert tried == [(3, 0, 0)] and first.features.shape == second.features.shape
    assert emb.store.read((3, 0, 0)) is not None  # every tile kept, not only the recent ones
    calls = _count_computes(monkeypatch, emb)
    assert emb.compute_all(planes=[3, 5], progress=False) == len(emb.entries([3, 5]))  # ahead too, without claims
    assert (3, 0, 0) not in calls and (5, 0, 0) in calls
    assert not (tmp_path / "c.zarr" / on_disk.key / "checksums" / "claims").exists()
    monkeypatch.setattr(emb.store, "write", lambda entry, features: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    with pytest.raises(OSError, match="I/O"):  # not a refusal of the folder: said as it is
        emb.embedding_for(6, (0, 0))

    real_open = EmbeddingStore.open

    def read_only_folder(path, *args, **kwargs):  # a read-only cache without this image's entries yet
        if path is not None:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(EmbeddingStore, "open", read_only_folder)
    with pytest.warns(UserWarning, match="embeddings are kept in memory only"):
        fresh = Embeddings(zarr.open_array(str(path), mode="r"), tiny_model, tmp_path / "ro.zarr", axes="ZYX",
                           tile=200, halo=25)
    assert fresh.store.path is None and fresh.embedding_for(2, (0, 0)).features.shape == first.features.shape


def test_a_cache_deleted_during_a_session_is_made_anew_not_left_headless(tiny_model, volume_zarr, tmp_path):
    import shutil

    path, _ = volume_zarr
    cache = tmp_path / "c.zarr"
    emb = Embeddings(zarr.open_array(str(path), mode="r"), tiny_model, cache, axes="ZYX", tile=200, halo=25)
    emb.embedding_for(3, (0, 0))
    shutil.rmtree(cache)  # caches cleaned while napari is open
    made = emb.embedding_for(6, (0, 0)).features
    later = Embeddings(zarr.open_array(str(path), mode="r"), tiny_model, cache, axes="ZYX", tile=200, halo=25)
    assert later.is_cached(6, (0, 0)) and not later.is_cached(3, (0, 0))
    assert torch.equal(later.embedding_for(6, (0, 0)).features, made)

def test_default_cache_goes_beside_a_zarr_image_or_into_the_user_cache(tiny_model, volume_zarr, tmp_path):
    path, data = volume_zarr
    src = ImageSource.open(path, axes="ZYX")
    assert default_cache_path(src, "blake2b:ff") == path.with_name("nuclei.sam-embeddings.zarr")
    emb = Embeddings(data[:2], tiny_model, axes="ZYX")
    assert emb.cache_path.parent == __import__("pathlib").Path(os.environ["NAPARI_SAM_CACHE_DIR"]) / "embeddings"


def test_a_zarr_array_opened_in_a_script_finds_the_cache_made_for_its_path(tmp_path):
    from napari_sam.core.io import read_image

    # an OME-Zarr image of two levels, as `napari-sam embed image.ome.zarr` sees it
    path = tmp_path / "image.ome.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"datasets": [{"path": "0"}, {"path": "1"}]}]}
    group.create_array("0", shape=(3, 40, 40), dtype="uint8")
    group.create_array("1", shape=(3, 20, 20), dtype="uint8")
    plain = zarr.create_array(str(tmp_path / "plain.zarr"), shape=(40, 40), dtype="uint8")
    beside = path.with_name("image.ome.sam-embeddings.zarr")
    assert default_cache_path(ImageSource.open(path), "blake2b:ff") == beside
    for array in (read_image(path), zarr.open_array(str(path / "0")), zarr.open_group(str(path))["0"]):
        assert default_cache_path(ImageSource(array), "blake2b:ff") == beside
    # any array inside the store (another level, named by its path too): beside the store, never inside it;
    # its entries are told apart by their signatures
    assert default_cache_path(ImageSource(group["1"]), "blake2b:ff") == beside
    assert default_cache_path(ImageSource.open(path / "1"), "blake2b:ff") == beside
    assert default_cache_path(ImageSource.open(path / "0"), "blake2b:ff") == beside
    assert default_cache_path(ImageSource(plain), "blake2b:ff") == tmp_path / "plain.sam-embeddings.zarr"
    in_memory = default_cache_path(ImageSource(np.zeros((40, 40), np.uint8)), "blake2b:ff")
    assert in_memory.parent == __import__("pathlib").Path(os.environ["NAPARI_SAM_CACHE_DIR"]) / "embeddings"


def test_two_worker_processes_write_the_same_cache_as_a_serial_run(tiny_model, volume_zarr, tmp_path):
    pytest.importorskip("distributed")
    path, _ = volume_zarr
    source = zarr.open_array(str(path), mode="r")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each single-threaded worker: the same arithmetic, bit for bit
    try:
        serial = Embeddings(source, tiny_model, tmp_path / "serial.zarr", axes="ZYX", tile=200, halo=25)
        serial.compute_all(planes=[0, 1, 7], progress=False)
    finally:
        torch.set_num_threads(threads)
    parallel = Embeddings(source, tiny_model, tmp_path / "parallel.zarr", axes="ZYX", tile=200, halo=25)
    reports = list(parallel.precompute(planes=[0, 1, 7], scheduler="local:2"))
    assert reports[-1].done == reports[-1].total == 12 and len(reports) == 13
    assert parallel.store.present()[[0, 1, 7]].all() and parallel.store.present().sum() == 12
    assert np.array_equal(np.asarray(parallel.store.checksums[...]), np.asarray(serial.store.checksums[...]))
    assert np.array_equal(np.asarray(parallel.store.features[[0, 1, 7]]), np.asarray(serial.store.features[[0, 1, 7]]))


def test_distributed_needs_a_model_file_and_a_disk_cache(tiny_sam, tiny_model, nuclei_2d):
    with pytest.raises(ValueError, match="load it with load_model"):
        list(Embeddings(nuclei_2d[0], tiny_sam, cache=False).precompute(scheduler="local:1"))
    with pytest.raises(ValueError, match="on-disk cache"):
        list(Embeddings(nuclei_2d[0], tiny_model, cache=False).precompute(scheduler="local:1"))


def test_models_with_a_smaller_input_get_matching_tiles_and_cache(nuclei_2d, tmp_path):
    from napari_sam.model import SamConfig, ViTConfig, build_sam

    torch.manual_seed(0)
    small = build_sam(SamConfig(ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=256),
                                name="mini", image_size=256))
    emb = Embeddings(nuclei_2d[0], small, tmp_path / "c.zarr")
    assert (emb.grid.tile, emb.grid.halo) == (192, 32) and emb.grid.grid_shape == (3, 3)
    assert emb.store.feature_shape == (256, 16, 16)
    got = emb.embedding_for(0, (1, 1))
    tile = emb.grid[1, 1]
    expected = Predictor(small).embed_image(nuclei_2d[0][tile.outer_slices], limits=emb.limits)
    assert got.features.shape == (1, 256, 16, 16) and torch.equal(got.features, expected.features)
    assert got.input_size == (256, 256)
    result = emb.segment(0, Prompt.make(points=[[250, 260]]), max_tiles=1)
    assert result.tiles == ((1, 1),) and result.mask.dtype == bool


def test_two_channels_of_an_image_share_a_cache_without_a_warning(tmp_path, tiny_model):
    rng = np.random.default_rng(0)
    chans = np.stack([rng.integers(0, 100, (64, 64)), rng.integers(0, 4000, (64, 64))]).astype(np.uint16)
    cache = tmp_path / "c.zarr"
    Embeddings(chans, tiny_model, cache=cache, axes="CYX", channel=0).compute_all(progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second channel's limits differ from the first's
        second = Embeddings(chans, tiny_model, cache=cache, axes="CYX", channel=1)
    assert not second.is_cached(0)
    assert Embeddings(chans, tiny_model, cache=cache, axes="CYX", channel=0).is_cached(0)
