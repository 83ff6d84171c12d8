"""Fault injection: an embedding run killed (SIGKILL) at ten random moments and resumed
each time ends with the same cache, bit for bit, as a run never interrupted, and with no
claims left behind."""

import os
import signal
import time

import numpy as np
import pytest

from napari_sam.core.claims import TileClaims, claims_folder
from napari_sam.core.embedding_store import EmbeddingStore, describe_cache
from tests.core.test_claims import logged, serial_cache, start_writer, write_small_checkpoint, write_volume

KILLS = 10
SEED = 20240611


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    return write_small_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_256.pth")


@pytest.fixture(scope="module")
def volume(tmp_path_factory, nuclei_3d):
    return write_volume(tmp_path_factory.mktemp("vol") / "vol.zarr", nuclei_3d[0])


def _wait(condition, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.exitcode is None, f"the writer ended (exit {proc.exitcode}) before it was killed"
        assert time.monotonic() < deadline, "the writer made no progress"
        time.sleep(0.002)


def test_ten_kills_at_random_moments_then_resume_give_the_uninterrupted_cache(small_checkpoint, volume, tmp_path):
    rng = np.random.default_rng(SEED)
    cache = tmp_path / "killed.zarr"
    log = tmp_path / "computed.log"
    stale_claims = 0
    for kill in range(KILLS):
        ready = tmp_path / f"ready-{kill}"
        before = len(logged(log))
        # Let 0-3 tiles finish, then wait a random moment more: the kill lands during the
        # start-up (model, cache opening, claims), inside a tile, or inside its write.
        tiles = int(rng.integers(0, 4))
        delay = float(rng.uniform(0, 0.3 if tiles == 0 else 0.05))
        proc = start_writer(small_checkpoint, volume, cache, log, ready)
        try:
            _wait(lambda: ready.exists() and len(logged(log)) >= before + tiles, proc)  # noqa: B023
            time.sleep(delay)
            assert proc.exitcode is None, f"kill {kill}: the writer finished before it was killed"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.join()
        assert proc.exitcode == -signal.SIGKILL
        if (cache / "zarr.json").exists():
            key = describe_cache(cache)[0]["key"]
            stale_claims += bool(TileClaims(claims_folder(cache, key)).present())
    partial = describe_cache(cache)[0]["present"]
    assert 0 < partial < 54  # every run was cut short, and together they kept some tiles
    assert stale_claims > 0  # some kills left a claim, which the next run took over

    final = start_writer(small_checkpoint, volume, cache, log)
    final.join(300)
    assert final.exitcode == 0
    computed = logged(log)
    assert len(computed) == len(set(computed))  # no stored tile was computed again
    reference = serial_cache(small_checkpoint, volume, tmp_path / "uninterrupted.zarr")
    assert set(computed) <= set(reference.entries())
    resumed = EmbeddingStore.attach(cache, reference.store.key)
    assert np.array_equal(np.asarray(resumed.checksums[...]), np.asarray(reference.store.checksums[...]))
    assert np.array_equal(np.asarray(resumed.features[...]), np.asarray(reference.store.features[...]))
    assert resumed.present().all() and len(describe_cache(cache)) == 1
    assert TileClaims(claims_folder(cache, resumed.key)).present() == []
