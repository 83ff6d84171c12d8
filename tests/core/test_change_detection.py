"""The image fingerprint sees every change on disk or in memory (finding 2 of the
"hostile first week" issue): a change in a chunk that the sample of 16 does not read must
still keep an old cache from being used. Each test changes a chunk outside the sample."""

import os
import time

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from zarr.storage import LocalStore

from napari_sam.core.embedding_store import CacheMismatchError
from napari_sam.core.embeddings import Embeddings
from napari_sam.core.image_source import ImageSource
from napari_sam.core.sampling import chunk_shape, sample_regions
from napari_sam.core.signature import describe_fingerprint, fingerprint


def _unsampled(shape, chunks):
    """The start (index of the first element) of every chunk the fingerprint's sample skips."""
    sampled = {tuple(r.start // c for r, c in zip(region, chunks)) for region in sample_regions(shape, chunks, 16)}
    grid = [-(-s // c) for s, c in zip(shape, chunks)]
    return [tuple(i * c for i, c in zip(idx, chunks)) for idx in np.ndindex(*grid) if idx not in sampled]


def _paint(array, start, value=255):
    """A disc of 60 pixels at a chunk's corner (the object a user would click)."""
    yy, xx = np.mgrid[:10, :10]
    disc = (yy - 4.5) ** 2 + (xx - 4.5) ** 2 < 20
    assert disc.sum() == 60
    z, y, x = start
    block = np.asarray(array[z, y : y + 10, x : x + 10])
    block[disc] = value
    # A later mtime than the write being compared with, whatever the clock's tick.
    time.sleep(0.02)
    array[z, y : y + 10, x : x + 10] = block


@pytest.fixture
def volume(tmp_path, nuclei_3d):
    """36 chunks of real nuclei, uint8 (passed through unchanged: only the fingerprint can differ)."""
    data = np.ascontiguousarray(nuclei_3d[0][:4, :96, :144]).astype(np.uint8)
    path = tmp_path / "vol.zarr"
    z = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(1, 32, 48))
    z[...] = data
    assert z.nchunks == 36
    return path, data


def test_a_change_in_an_unsampled_chunk_keeps_the_old_cache_from_being_used(tiny_model, volume, tmp_path):
    """The finding's reproduction: embed, paint a 60-pixel object where the sample does
    not look, open again: the cache must not be used, and the difference is named."""
    path, data = volume
    cache = tmp_path / "cache.zarr"
    first = Embeddings(ImageSource.open(path, axes="ZYX"), tiny_model, cache)
    first.compute_all(progress=False)
    start = _unsampled(data.shape, (1, 32, 48))[0]
    _paint(zarr.open_array(str(path), mode="r+"), start)

    with pytest.raises(CacheMismatchError, match="image_fingerprint: "):
        Embeddings(ImageSource.open(path, axes="ZYX"), tiny_model, cache, on_mismatch="error")
    with pytest.warns(UserWarning, match="image_fingerprint: "):
        again = Embeddings(ImageSource.open(path, axes="ZYX"), tiny_model, cache)
    assert [d.split(":")[0] for d in first.signature.differences(again.signature)] == ["image_fingerprint"]
    assert not again.store.present().any()  # nothing of the old cache passes for the new image
    stale = first.store.read((start[0], 0, 0))
    fresh = again.embedding_for(start[0]).features.numpy()
    assert not np.array_equal(stale, fresh.reshape(stale.shape))  # the old entry was indeed stale
    assert describe_fingerprint(first.signature.image_fingerprint) == (
        "store listing (37 files: names, sizes, mtimes) + 16 sampled chunks")


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_every_chunk_on_disk_counts_and_only_16_are_read(tmp_path, zarr_format, monkeypatch):
    data = np.random.default_rng(0).integers(0, 200, (16, 128, 128), dtype=np.uint8)
    path = tmp_path / "v.zarr"
    z = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(1, 16, 16),
                          zarr_format=zarr_format)
    z[...] = data
    z = zarr.open_array(str(path), mode="r")
    reads = []
    get = LocalStore.get

    async def counting(self, key, *args, **kwargs):
        reads.append(key)
        return await get(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", counting)
    base = fingerprint(z)
    monkeypatch.undo()
    assert len(reads) == 16 and z.nchunks == 1024  # the listing stats files, it does not read them
    kind = base.split(":")[0]

    writable = zarr.open_array(str(path), mode="r+")
    for start in _unsampled(data.shape, (1, 16, 16))[::250]:
        time.sleep(0.02)
        writable[start[0], start[1], start[2]] = data[start] ^ 1
        changed = fingerprint(z)
        assert changed != base, start
        base = changed
    assert fingerprint(z) == base  # deterministic
    assert kind == f"listing{1024 + (1 if zarr_format == 3 else 2)}+sample16"  # the chunks and the metadata


def test_a_deleted_chunk_and_a_nested_node(tmp_path):
    path = tmp_path / "img.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.attrs["multiscales"] = [{"axes": ["z", "y", "x"], "datasets": [{"path": "0"}]}]
    arr = group.create_array("0", shape=(4, 64, 64), dtype="uint16", chunks=(1, 16, 16))
    arr[...] = 7
    source = ImageSource.open(path)
    assert source.axes == "ZYX"
    base = fingerprint(source.array)
    group.create_array("labels", shape=(4, 64, 64), dtype="uint8", chunks=(1, 16, 16))[...] = 1
    assert fingerprint(ImageSource.open(path).array) == base  # another node of the group
    z0, y0, x0 = _unsampled((4, 64, 64), (1, 16, 16))[0]
    (path / "0" / "c" / str(z0) / str(y0 // 16) / str(x0 // 16)).unlink()  # reads as the fill value now
    assert fingerprint(ImageSource.open(path).array) != base


def test_what_is_not_detected_a_same_size_rewrite_with_its_mtime_restored(tmp_path):
    """The documented blind spot: uncompressed chunks keep their size, and the old mtime
    is put back by hand; only the sampled chunks would then show the change."""
    path = tmp_path / "raw.zarr"
    z = zarr.create_array(str(path), shape=(36, 32, 32), dtype="uint8", chunks=(1, 32, 32), compressors=None)
    z[...] = 3
    base = fingerprint(z)
    plane = _unsampled((36, 32, 32), (1, 32, 32))[0][0]
    chunk = path / "c" / str(plane) / "0" / "0"
    st = chunk.stat()
    z[plane, 5, 5] = 4
    os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert chunk.stat().st_size == st.st_size and fingerprint(z) == base
    first = path / "c" / "0" / "0" / "0"  # the first chunk is always sampled
    st = first.stat()
    z[0, 5, 5] = 4
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint(z) != base


@pytest.mark.parametrize("suffix", [".tif", ".npy"])
def test_files_are_read_whole_so_their_content_is_hashed(tmp_path, suffix):
    data = np.random.default_rng(1).integers(0, 4000, (20, 64, 64), dtype=np.uint16)
    path = tmp_path / f"img{suffix}"

    def write(array):
        tifffile.imwrite(path, array) if suffix == ".tif" else np.save(path, array)

    write(data)
    base = fingerprint(ImageSource.open(path, axes="ZYX").array)
    st = path.stat()
    changed = data.copy()
    plane = _unsampled(data.shape, chunk_shape(data))[0][0]
    changed[plane, 40, 3] += 1  # a plane outside the 16 virtual chunks the old sample read
    write(changed)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime put back
    assert path.stat().st_size == st.st_size
    assert fingerprint(ImageSource.open(path, axes="ZYX").array) != base
    write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # copied or touched: same pixels
    assert fingerprint(ImageSource.open(path, axes="ZYX").array) == base
    assert describe_fingerprint(base) == "whole array hashed"


def test_memory_maps_fold_their_file(tmp_path):
    data = np.zeros((40, 64, 64), np.uint8)
    path = tmp_path / "m.npy"
    np.save(path, data)
    mapped = np.load(path, mmap_mode="r")
    assert isinstance(mapped, np.memmap)
    base = fingerprint(mapped)
    time.sleep(0.02)
    rw = np.load(path, mmap_mode="r+")
    rw[_unsampled(data.shape, chunk_shape(data))[0][0], 60, 60] = 1
    rw.flush()
    del rw
    os.utime(path)  # writes through a mapping reach the mtime when the system flushes them
    assert fingerprint(np.load(path, mmap_mode="r")) != base
    assert describe_fingerprint(base) == "file size and mtime + 16 sampled chunks"


def test_dask_arrays_use_their_token_and_the_zarr_stores_in_their_graph(tmp_path):
    data = np.random.default_rng(2).integers(0, 200, (20, 64, 64), dtype=np.uint8)
    in_memory = da.from_array(data, chunks=(1, 64, 64))
    base = fingerprint(in_memory)
    assert base == fingerprint(da.from_array(data.copy(), chunks=(1, 64, 64)))  # deterministic
    changed = data.copy()
    changed[19, 63, 0] += 1  # outside the sample
    assert fingerprint(da.from_array(changed, chunks=(1, 64, 64))) != base
    assert fingerprint(in_memory + 1) != base  # another graph

    path = tmp_path / "d.zarr"
    z = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(1, 32, 32))
    z[...] = data
    lazy = fingerprint(da.from_zarr(str(path)))
    start = _unsampled(data.shape, chunk_shape(z))[0]
    time.sleep(0.02)
    z[start] = data[start] ^ 1
    # dask's token names the store, not its content: the listing sees the change
    assert fingerprint(da.from_zarr(str(path))) != lazy
    assert describe_fingerprint(base) == "dask token + 16 sampled chunks"
    assert describe_fingerprint(lazy).startswith("dask token + store listing (81 files")


def test_stores_reached_through_fsspec_are_listed_too():
    z = zarr.create_array("memory://fp-test.zarr", shape=(20, 32, 32), dtype="uint8", chunks=(1, 32, 32))
    z[...] = 1
    base = fingerprint(z)
    plane = _unsampled((20, 32, 32), (1, 32, 32))[0][0]
    time.sleep(0.02)
    z[plane, 0, 0] = 2  # a remote listing's own time stamp (here: when the file was created) moves
    assert fingerprint(z) != base
    assert describe_fingerprint(base) == "store listing (21 files: names, sizes, mtimes) + 16 sampled chunks"


def test_zip_stores_fold_the_zip_file(tmp_path):
    path = tmp_path / "v.zip"
    with zarr.storage.ZipStore(path, mode="w") as store:
        zarr.create_array(store, shape=(20, 32, 32), dtype="uint8", chunks=(1, 32, 32))[...] = 1
    base = fingerprint(zarr.open_array(zarr.storage.ZipStore(path, mode="r"), mode="r"))
    assert describe_fingerprint(base) == "file size and mtime + 16 sampled chunks"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten (a zip is rewritten whole)
    assert fingerprint(zarr.open_array(zarr.storage.ZipStore(path, mode="r"), mode="r")) != base
