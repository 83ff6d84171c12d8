"""The user cache folder's embedding caches: listed, and old or excess ones removed."""

import dataclasses
import json
import os
import time

import numpy as np
import pytest
import zarr

from napari_sam.core import cache_housekeeping as housekeeping
from napari_sam.core.claims import Claim, claims_folder
from napari_sam.core.embedding_store import EmbeddingStore
from napari_sam.core.signature import CacheSignature

SIG = CacheSignature(
    model="vit_t", checkpoint="sha256:00", dtype="float32", normalization={"mode": "auto"}, tile=768, halo=128,
    shape=(2, 700, 900), dtype_in="uint16", axes="ZYX", image_fingerprint="blake2b:ab",
)
DAY = 86400.0


def _cache(folder, name, tiles, age_days, now):
    path = folder / name
    store = EmbeddingStore.open(path, dataclasses.replace(SIG, image_fingerprint=f"blake2b:{name}"), (2, 1, 2))
    for t in range(tiles):
        store.write((0, 0, t), np.full((256, 64, 64), t, np.float32))
    os.utime(path / "zarr.json", (now - age_days * DAY, now - age_days * DAY))
    return path


def _folder(tmp_path, now):
    folder = tmp_path / "embeddings"
    old = _cache(folder, "old.zarr", 2, 40, now)
    mid = _cache(folder, "mid.zarr", 1, 10, now)
    new = _cache(folder, "new.zarr", 1, 1, now)
    (folder / "notes").mkdir()  # not ours: never listed, never removed
    (folder / "notes" / "a.txt").write_text("keep me")
    zarr.open_group(str(folder / "foreign.zarr"), mode="w").create_array("x", shape=(2,), dtype="u1")
    (folder / ".removing-1234abcd-gone.zarr").mkdir()  # left by a removal that was interrupted
    return folder, old, mid, new


def test_caches_are_listed_least_recently_used_first_and_others_left_alone(tmp_path):
    now = time.time()
    folder, old, mid, new = _folder(tmp_path, now)
    found = housekeeping.user_caches(folder)
    assert [c.path for c in found] == [old, mid, new]
    assert found[0].bytes > found[1].bytes > 0  # two tiles against one
    assert found[0].entries == ["vit_t, 2x700x900 ZYX"] and not any(c.busy for c in found)
    assert abs(found[0].last_used - (now - 40 * DAY)) < 1
    assert not (folder / ".removing-1234abcd-gone.zarr").exists()  # the leftover is cleared


def test_old_and_excess_caches_are_removed_and_busy_ones_kept(tmp_path):
    now = time.time()
    folder, old, mid, new = _folder(tmp_path, now)
    found = housekeeping.user_caches(folder)
    assert [c.path for c in housekeeping.remove(found, older_than_days=30, dry_run=True, now=now)] == [old]
    assert old.is_dir()  # a dry run removes nothing
    assert [c.path for c in housekeeping.remove(found, older_than_days=30, now=now)] == [old]
    assert not old.exists() and mid.is_dir() and new.is_dir()
    assert (folder / "notes" / "a.txt").read_text() == "keep me" and (folder / "foreign.zarr").is_dir()
    # down to a size: the least recently used go first
    found = housekeeping.user_caches(folder)
    assert [c.path for c in housekeeping.remove(found, max_bytes=found[1].bytes, now=now)] == [mid]
    assert new.is_dir() and [c.path for c in housekeeping.user_caches(folder)] == [new]
    # a cache being written (a live claim) stays, whatever its age or size
    claims = claims_folder(new, EmbeddingStore.open(new, dataclasses.replace(SIG, image_fingerprint="blake2b:new.zarr"),
                                                    (2, 1, 2)).key)
    claims.mkdir(parents=True, exist_ok=True)
    gone = Claim.mine()
    (claims / "0.0.0").write_text(json.dumps(dict(dataclasses.asdict(gone), pid=2**22 + 17)))  # a dead writer's
    assert not housekeeping.user_caches(folder)[0].busy
    (claims / "0.0.1").write_text(json.dumps(dataclasses.asdict(Claim.mine())))  # this live process's
    busy = housekeeping.user_caches(folder)
    assert busy[0].busy and housekeeping.remove(busy, older_than_days=0.0001, max_bytes=0, now=now + DAY) == []
    assert new.is_dir()


def test_opening_a_cache_for_work_marks_it_used(tmp_path):
    now = time.time()
    folder, old, *_ = _folder(tmp_path, now)
    EmbeddingStore.open(old, dataclasses.replace(SIG, image_fingerprint="blake2b:old.zarr"), (2, 1, 2))
    assert housekeeping.user_caches(folder)[-1].path == old  # now the most recently used
    assert housekeeping.user_caches(folder)[-1].last_used > now - 60


def test_a_session_at_work_for_days_keeps_its_cache_recently_used(tmp_path, monkeypatch):
    # a napari session opens its cache once and then reads and writes tiles for days: its
    # reads and writes mark the cache used now and then, and only a store opened for work does
    from napari_sam.core import embedding_store

    now = time.time()
    folder, old, *_ = _folder(tmp_path, now)
    sig = dataclasses.replace(SIG, image_fingerprint="blake2b:old.zarr")
    store = EmbeddingStore.open(old, sig, (2, 1, 2))
    reader = EmbeddingStore(zarr.open_group(str(old / store.key), mode="r"), sig, str(old))  # as info reads it
    ancient = now - 40 * DAY
    os.utime(old / "zarr.json", (ancient, ancient))  # opened 40 days ago
    assert store.read((0, 0, 1)) is not None  # within the interval: no mark
    assert abs((old / "zarr.json").stat().st_mtime - ancient) < 1
    monkeypatch.setattr(embedding_store, "MARK_USED_EVERY", 0.0)
    assert reader.read((0, 0, 1)) is not None  # a look is not a use
    assert abs((old / "zarr.json").stat().st_mtime - ancient) < 1
    assert np.array_equal(store.read((0, 0, 1)), np.full((256, 64, 64), 1, np.float32))
    assert (old / "zarr.json").stat().st_mtime > now - 60
    assert old not in [c.path for c in housekeeping.remove(housekeeping.user_caches(folder), older_than_days=30)]
    os.utime(old / "zarr.json", (ancient, ancient))
    store.write((1, 0, 0), np.zeros((256, 64, 64), np.float32))  # so does a tile written
    assert (old / "zarr.json").stat().st_mtime > now - 60 and old.is_dir()


def test_a_session_answering_from_tiles_in_memory_keeps_its_cache_recently_used(tmp_path, monkeypatch, tiny_model):
    # a small image's tiles stay in the session's memory after their first read: clicks on
    # them for days never read the cache again, and still count as using it
    from napari_sam.core import embedding_store
    from napari_sam.core.embeddings import Embeddings

    cache = tmp_path / "c.zarr"
    emb = Embeddings(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), tiny_model, cache)
    first = emb.embedding_for(0)
    ancient = time.time() - 40 * DAY
    os.utime(cache / "zarr.json", (ancient, ancient))
    reads = []
    monkeypatch.setattr(EmbeddingStore, "read", lambda self, entry: reads.append(entry))
    monkeypatch.setattr(embedding_store, "MARK_USED_EVERY", 0.0)
    assert emb.embedding_for(0) is first and reads == []  # from memory
    assert (cache / "zarr.json").stat().st_mtime > time.time() - 60


def test_a_cache_opened_after_the_listing_is_not_removed(tmp_path):
    # an embed that opens the cache between the listing and the removal keeps it
    now = time.time()
    folder, old, *_ = _folder(tmp_path, now)
    listed = housekeeping.user_caches(folder)
    EmbeddingStore.open(old, dataclasses.replace(SIG, image_fingerprint="blake2b:old.zarr"), (2, 1, 2))
    assert housekeeping.remove(listed, older_than_days=30, now=now) == [] and old.is_dir()


def test_what_a_writers_claims_leave_of_a_removed_cache_becomes_a_cache_again(tmp_path):
    # a writer's claim on a cache removed under it recreates <key>/checksums/claims/: the
    # next opening must make a cache there, not refuse the folder as foreign
    sig = dataclasses.replace(SIG, image_fingerprint="blake2b:x")
    path = tmp_path / "c.zarr"
    store = EmbeddingStore.open(path, sig, (2, 1, 2))
    claims = claims_folder(path, store.key)
    import shutil

    shutil.rmtree(path)
    claims.mkdir(parents=True)
    (claims / "0.0.0").write_text(json.dumps(dataclasses.asdict(Claim.mine())))
    again = EmbeddingStore.open(path, sig, (2, 1, 2))
    again.write((0, 0, 0), np.ones((256, 64, 64), np.float32))
    assert again.read((0, 0, 0)) is not None
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not an embedding cache"):
        EmbeddingStore.open(tmp_path / "foreign", sig, (2, 1, 2))
