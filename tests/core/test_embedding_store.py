"""The Zarr embedding cache: entries, checksums, signatures, damage."""

import dataclasses
import warnings

import numpy as np
import pytest
import zarr

from napari_sam.core.embedding_store import (
    CacheMismatchError,
    EmbeddingStore,
    TileCheck,
    describe_cache,
    signature_key,
)
from napari_sam.core.signature import CacheSignature

SIG = CacheSignature(
    model="vit_t", checkpoint="sha256:00", dtype="float32", normalization={"mode": "auto"}, tile=768, halo=128,
    shape=(3, 2000, 1500), dtype_in="uint16", axes="ZYX", image_fingerprint="blake2b:ab",
)
LAYOUT = (3, 3, 2)


def _features(seed):
    return np.random.default_rng(seed).standard_normal((256, 64, 64)).astype(np.float32)


def test_entries_round_trip_and_are_absent_until_written(tmp_path):
    store = EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT)
    assert store.layout == LAYOUT and not store.present().any()
    assert store.read((1, 2, 1)) is None
    store.write((1, 2, 1), _features(0))
    assert np.array_equal(store.read((1, 2, 1)), _features(0))
    assert store.missing([(1, 2, 1), (0, 0, 0)]) == [(0, 0, 0)]
    again = EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT)  # reopened: still there
    assert np.array_equal(again.read((1, 2, 1)), _features(0))
    info = describe_cache(tmp_path / "c.zarr")
    assert [(i["key"], i["present"], i["total"]) for i in info] == [(signature_key(SIG), 1, 18)]
    assert info[0]["bytes"] > 256 * 64 * 64  # the entry is on disk


def test_features_without_their_checksum_count_as_absent(tmp_path):
    # a crash between the two writes leaves the features but no checksum
    store = EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT)
    store.features[0, 1, 1] = _features(1)
    assert store.read((0, 1, 1)) is None and store.missing([(0, 1, 1)]) == [(0, 1, 1)]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_values"])
def test_damaged_entries_are_detected_and_forgotten(tmp_path, damage):
    store = EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT)
    store.write((2, 0, 1), _features(2))
    store.write((2, 1, 1), _features(3))
    chunk = tmp_path / "c.zarr" / store.key / "features" / "c" / "2" / "0" / "1" / "0" / "0" / "0"
    assert chunk.is_file()
    if damage == "garbage":
        chunk.write_bytes(b"\x00not a chunk" * 100)
    elif damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:1000])
    else:
        store.features[2, 0, 1] = _features(9)  # valid chunk, wrong values
    assert store.missing([(2, 0, 1), (2, 1, 1)]) == []  # presence alone does not read the data
    assert store.missing([(2, 0, 1), (2, 1, 1)], verify=True) == [(2, 0, 1)]
    assert store.read((2, 0, 1)) is None and not store.present()[2, 0, 1]
    assert np.array_equal(store.read((2, 1, 1)), _features(3))


def test_float16_storage_halves_the_cache(tmp_path):
    sig = dataclasses.replace(SIG, storage="float16")
    store = EmbeddingStore.open(tmp_path / "c.zarr", sig, LAYOUT)
    store.write((0, 0, 0), _features(0))
    back = store.read((0, 0, 0))
    assert back.dtype == np.float32 and store.features.dtype == np.float16
    np.testing.assert_allclose(back, _features(0), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="storage dtype"):
        EmbeddingStore.open(tmp_path / "d.zarr", dataclasses.replace(SIG, storage="int8"), LAYOUT)


def test_other_signatures_are_kept_refused_or_replaced(tmp_path):
    path = tmp_path / "c.zarr"
    EmbeddingStore.open(path, SIG, LAYOUT).write((0, 0, 0), _features(0))
    other = dataclasses.replace(SIG, tile=512, halo=64)
    with pytest.raises(CacheMismatchError, match=r"tile: 768 \(cache\) vs 512 \(request\); halo: 128 \(cache\) vs 64"):
        EmbeddingStore.open(path, other, (3, 4, 3), on_mismatch="error")
    with pytest.warns(UserWarning, match="computed differently"):
        kept = EmbeddingStore.open(path, other, (3, 4, 3), on_mismatch="keep")
    assert not kept.present().any()
    assert sorted(i["key"] for i in describe_cache(path)) == sorted([signature_key(SIG), signature_key(other)])
    # the old entries are still there and still valid
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(EmbeddingStore.open(path, SIG, LAYOUT).read((0, 0, 0)), _features(0))
    EmbeddingStore.open(path, dataclasses.replace(SIG, dtype="bfloat16"), LAYOUT, on_mismatch="replace")
    assert [i["signature"]["dtype"] for i in describe_cache(path)] == ["bfloat16"]


def test_workers_attach_to_existing_entries_only(tmp_path):
    store = EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT)
    EmbeddingStore.attach(tmp_path / "c.zarr", store.key).write((1, 0, 0), _features(4))
    assert np.array_equal(store.read((1, 0, 0)), _features(4))
    with pytest.raises(ValueError, match="has no entries"):
        EmbeddingStore.attach(tmp_path / "c.zarr", "0123456789abcdef")


def test_an_empty_folder_becomes_a_cache(tmp_path):
    (tmp_path / "new").mkdir()
    store = EmbeddingStore.open(tmp_path / "new", SIG, LAYOUT)
    assert (tmp_path / "new" / "zarr.json").is_file()
    assert store.read((0, 0, 0)) is None and not store.present().any()


def test_foreign_folders_are_not_used_as_caches(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cells.png").write_bytes(b"not zarr")
    with pytest.raises(ValueError, match="not a Zarr v3 store"):
        EmbeddingStore.open(tmp_path / "photos", SIG, LAYOUT)
    zarr.create_array(str(tmp_path / "image.zarr"), shape=(4, 4), dtype="uint8")
    with pytest.raises(ValueError, match="not an embedding cache|not a Zarr"):
        EmbeddingStore.open(tmp_path / "image.zarr", SIG, LAYOUT)
    grp = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    grp.create_array("raw", shape=(4, 4), dtype="uint8")
    with pytest.raises(ValueError, match="not an embedding cache"):
        EmbeddingStore.open(tmp_path / "group.zarr", SIG, LAYOUT)
    with pytest.raises(ValueError, match="not an embedding cache"):
        describe_cache(tmp_path / "photos")
    # `napari-sam info` reads: no advice to choose a location, and a missing or empty folder said as such
    with pytest.raises(ValueError, match="group.zarr is a Zarr group, but not an embedding cache$"):
        describe_cache(tmp_path / "group.zarr")
    with pytest.raises(FileNotFoundError, match="no embedding cache at .*missing.zarr: no such folder"):
        describe_cache(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is an empty folder, not an embedding cache"):
        describe_cache(tmp_path / "empty")


def test_layout_must_match(tmp_path):
    EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT)
    with pytest.raises(ValueError, match="layout"):
        EmbeddingStore.open(tmp_path / "c.zarr", SIG, (3, 1, 1))


def test_verify_reads_every_tile_and_reports_damage_without_repairing(tmp_path):
    store = EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT)
    for entry in [(0, 0, 0), (1, 2, 1), (2, 1, 0)]:
        store.write(entry, _features(sum(entry)))
    assert store.verify() == TileCheck(3, [], []) and store.verify().clean
    features = tmp_path / "c.zarr" / store.key / "features" / "c"
    (features / "1" / "2" / "1" / "0" / "0" / "0").write_bytes(b"garbage" * 50)
    (features / "2" / "1" / "0" / "0" / "0" / "0").unlink()
    check = store.verify()
    assert check == TileCheck(3, [(1, 2, 1)], [(2, 1, 0)]) and not check.clean
    assert store.present().sum() == 3  # a check changes nothing; the next embed repairs
    described = describe_cache(tmp_path / "c.zarr", verify=True)[0]["check"]
    assert described == check and describe_cache(tmp_path / "c.zarr")[0]["check"] is None


@pytest.mark.parametrize("lost", ["features", "checksums", "garbage group", "garbage array", "group"])
def test_a_group_that_lost_an_arrays_metadata_is_rebuilt_not_a_crash(tmp_path, lost):
    store = EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT)
    store.write((0, 0, 0), _features(0))
    group = tmp_path / "c.zarr" / store.key
    if lost == "garbage group":  # zarr's own listing of the groups parses this and stops at it
        (group / "zarr.json").write_text("garbage{")
    elif lost == "garbage array":
        (group / "features" / "zarr.json").write_text("garbage{")
    elif lost == "group":  # its arrays remain: a new group must not be made over them
        (group / "zarr.json").unlink()
    else:
        (group / lost / "zarr.json").unlink()
    assert describe_cache(tmp_path / "c.zarr") == []  # listed as nothing usable, not a KeyError
    again = EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT)  # the entries are computed again
    assert again.layout == LAYOUT and not again.present().any()
    again.write((0, 0, 0), _features(1))
    assert np.array_equal(EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT).read((0, 0, 0)), _features(1))


def test_a_damaged_checksum_chunk_is_an_absent_entry_and_reported_not_a_crash(tmp_path):
    store = EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT)
    for entry in [(0, 0, 0), (1, 0, 1), (2, 1, 0)]:
        store.write(entry, _features(entry[0]))
    (tmp_path / "c.zarr" / store.key / "checksums" / "c" / "1" / "0" / "1").write_bytes(b"gar")
    again = EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT)
    assert again.present().sum() == 2 and again.read((1, 0, 1)) is None
    assert again.verify() == TileCheck(3, [(1, 0, 1)], [])
    assert describe_cache(tmp_path / "c.zarr")[0]["present"] == 2
    again.write((1, 0, 1), _features(5))  # computed again: the chunk is whole again
    assert np.array_equal(again.read((1, 0, 1)), _features(5)) and again.verify().clean


@pytest.mark.parametrize("tamper", ["signature field", "features dtype", "features shape"])
def test_altered_cache_metadata_is_a_damaged_group_rebuilt_never_trusted(tmp_path, tamper):
    import json

    store = EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT)
    store.write((0, 0, 0), _features(0))
    group = tmp_path / "c.zarr" / store.key
    meta_file = group / ("zarr.json" if tamper == "signature field" else "features/zarr.json")
    meta = json.loads(meta_file.read_text())
    if tamper == "signature field":
        meta["attributes"]["signature"]["image_fingerprint"] = 5
    elif tamper == "features dtype":
        meta["data_type"] = "int8"
    else:
        meta["shape"][0] = 1
    meta_file.write_text(json.dumps(meta))
    assert describe_cache(tmp_path / "c.zarr") == []  # listed as nothing usable, not a traceback
    again = EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT)
    assert not again.present().any()
    again.write((0, 0, 0), _features(1))
    assert np.array_equal(again.read((0, 0, 0)), _features(1)) and again.verify().clean


def test_another_channel_of_the_image_is_kept_beside_without_a_warning(tmp_path):
    path = tmp_path / "c.zarr"
    first = dataclasses.replace(SIG, channel=0)
    EmbeddingStore.open(path, first, LAYOUT).write((0, 0, 0), _features(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = EmbeddingStore.open(path, dataclasses.replace(SIG, channel=1), LAYOUT)
    assert not second.present().any()
    assert np.array_equal(EmbeddingStore.open(path, first, LAYOUT).read((0, 0, 0)), _features(0))


def test_a_sessions_write_remakes_a_deleted_cache_and_falls_back_to_memory_when_refused(tmp_path, monkeypatch):
    import errno
    import shutil

    store = EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT)
    store.write((0, 0, 0), _features(0))
    shutil.rmtree(tmp_path / "c.zarr")  # cleaned during the session (SAM's embeddings and SAM 2's features alike)
    from napari_sam.core.cache_fallback import write_kept

    again = write_kept(store, (1, 0, 0), _features(1))
    assert again.path == store.path and np.array_equal(
        EmbeddingStore.open(tmp_path / "c.zarr", SIG, LAYOUT).read((1, 0, 0)), _features(1))

    def refused(entry, features):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "c.zarr"))

    monkeypatch.setattr(again, "write", refused)
    with pytest.warns(UserWarning, match=r"cannot be written \(No space left on device\)"):
        memory = write_kept(again, (2, 1, 1), _features(2))
    assert memory.path is None and np.array_equal(memory.read((2, 1, 1)), _features(2))
    monkeypatch.setattr(again, "write", lambda e, f: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        write_kept(again, (2, 0, 0), _features(3))


def _copy_entry(store_from, entry_from, store_to, entry_to):
    """Copy a tile's two chunk files by hand, as someone tidying caches might."""
    import shutil
    from pathlib import Path

    for array in ("features", "checksums"):
        tail = [str(i) for i in entry_from] + (["0", "0", "0"] if array == "features" else [])
        dest = [str(i) for i in entry_to] + (["0", "0", "0"] if array == "features" else [])
        source = Path(store_from.path) / store_from.key / array / "c" / Path(*tail)
        target = Path(store_to.path) / store_to.key / array / "c" / Path(*dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def test_a_tile_copied_from_another_images_cache_or_place_is_not_used(tmp_path):
    # never answer from embeddings of other data: the checksum covers the entries' key
    # (the signature, with the image's fingerprint) and the tile's place
    mine = EmbeddingStore.open(tmp_path / "a.zarr", SIG, LAYOUT)
    theirs = EmbeddingStore.open(tmp_path / "b.zarr", dataclasses.replace(SIG, image_fingerprint="blake2b:cd"), LAYOUT)
    theirs.write((0, 0, 0), _features(5))
    mine.write((1, 0, 0), _features(6))
    _copy_entry(theirs, (0, 0, 0), mine, (0, 0, 0))
    _copy_entry(mine, (1, 0, 0), mine, (2, 1, 1))
    assert mine.stored((0, 0, 0)) and mine.stored((2, 1, 1))  # both look present ...
    check = mine.verify()
    assert sorted(check.damaged) == [(0, 0, 0), (2, 1, 1)]  # ... and fail their check
    assert mine.read((0, 0, 0)) is None and mine.read((2, 1, 1)) is None
    assert np.array_equal(mine.read((1, 0, 0)), _features(6))
    assert np.array_equal(theirs.read((0, 0, 0)), _features(5))


def test_a_group_written_before_checksums_covered_key_and_place_still_reads(tmp_path):
    path = tmp_path / "c.zarr"
    store = EmbeddingStore.open(path, SIG, LAYOUT)
    del store.group.attrs["checksum"]  # as groups were written until 2026-12-07, in caches of format 1
    root = zarr.open_group(str(path), mode="r+")
    root.attrs["napari_sam"] = {"format": 1}
    legacy = EmbeddingStore.open(path, SIG, LAYOUT)
    legacy.write((0, 1, 0), _features(7))
    again = EmbeddingStore.open(path, SIG, LAYOUT)
    assert np.array_equal(again.read((0, 1, 0)), _features(7)) and again.verify().damaged == []
    import xxhash

    assert int(np.asarray(again.checksums[0, 1, 0])) == xxhash.xxh3_64_intdigest(_features(7).tobytes())
    # opened for work, the cache is marked format 2, which an older napari-sam refuses
    # rather than rewriting the placed checksums of new groups
    assert dict(zarr.open_group(str(path), mode="r").attrs)["napari_sam"] == {"format": 2}
    root = zarr.open_group(str(path), mode="r+")
    root.attrs["napari_sam"] = {"format": 3}
    with pytest.raises(ValueError, match="format 3, made by a newer napari-sam"):
        EmbeddingStore.open(path, SIG, LAYOUT)
