"""Claims on embedding-cache tiles: several writers of one cache share the work, a claim
whose writer died is taken over, and the shared result equals a serial run bit for bit."""

import dataclasses
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from napari_sam.core.claims import Claim, TileClaims, cache_lock, claims_folder
from napari_sam.core.embeddings import Embeddings
from napari_sam.core.models import load_model
from napari_sam.model import build_sam, config_to_dict
from napari_sam.model.checkpoint import write_checkpoint
from tests.conftest import TINY

TILE, HALO = 40, 8  # a 120 x 120 plane is 3 x 3 tiles

def write_small_checkpoint(path):
    """The tiny test SAM with a 256-pixel input: the same code paths, ~20 ms per tile."""
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, encoder=dataclasses.replace(TINY.encoder, img_size=256), image_size=256,
                                 name="tiny-256")
    write_checkpoint(path, build_sam(config).state_dict(), {"config": config_to_dict(config)})
    return path


def write_volume(path, nuclei):
    """Real nuclei, 6 planes of 120 x 120 in Zarr: 54 tiles."""
    data = nuclei[10:70:10, :120, :120].astype(np.uint16) * 40
    z = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(1, 64, 64))
    z[...] = data
    return path


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    return write_small_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_256.pth")


@pytest.fixture(scope="module")
def volume(tmp_path_factory, nuclei_3d):
    return write_volume(tmp_path_factory.mktemp("vol") / "vol.zarr", nuclei_3d[0])


def write_tiles(checkpoint, image, cache, log, ready=None, go=None):
    """One writer, run in a process of its own: loads the model, says it is ready, waits
    for the go file, embeds every missing tile into the cache with one torch thread, and
    logs each tile it computed itself (one JSON line per tile, after the tile is stored)."""
    torch.set_num_threads(1)
    model = load_model(checkpoint, device="cpu", dtype="float32")
    if ready:
        Path(ready).touch()
    while go and not Path(go).exists():
        time.sleep(0.005)
    emb = Embeddings(zarr.open_array(str(image), mode="r"), model, cache, axes="ZYX", tile=TILE, halo=HALO)
    compute = emb._compute

    def logged_compute(entry):
        out = compute(entry)
        with open(log, "a") as f:
            f.write(json.dumps([int(i) for i in entry]) + "\n")
        return out

    emb._compute = logged_compute
    emb.compute_all(progress=False)


def start_writer(*args) -> multiprocessing.Process:
    """:func:`write_tiles` in a new process. A fork server that has imported torch and the
    package already starts each in a fraction of a second (a fresh interpreter takes ~3 s)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "zarr", "napari_sam.core.embeddings", "tests.core.test_claims"])
    proc = context.Process(target=write_tiles, args=args, daemon=True)
    proc.start()
    return proc


def logged(path):
    """The tiles a writer logged, in order."""
    if not path.exists():
        return []
    return [tuple(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def serial_cache(checkpoint, image, cache):
    """An uninterrupted single-writer run with one torch thread: the reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        emb = Embeddings(zarr.open_array(str(image), mode="r"), load_model(checkpoint, device="cpu", dtype="float32"),
                         cache, axes="ZYX", tile=TILE, halo=HALO)
        emb.compute_all(progress=False)
    finally:
        torch.set_num_threads(threads)
    return emb


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_claim(claims, entry, **fields):
    claim = dataclasses.replace(Claim.mine(), **fields)
    claims.path(entry).parent.mkdir(parents=True, exist_ok=True)
    claims.path(entry).write_text(json.dumps(dataclasses.asdict(claim)))
    return claim


# -- one process ---------------------------------------------------------------------------
def test_a_live_claim_excludes_other_writers_until_released(tmp_path):
    folder = claims_folder(tmp_path / "c.zarr", "abc")
    first, second = TileClaims(folder), TileClaims(folder)
    assert first.acquire((0, 1, 2)) and first.acquire((0, 1, 2))  # held: asking again is fine
    assert not second.acquire((0, 1, 2))
    holder = second.holder((0, 1, 2))
    assert holder.pid == os.getpid() and holder.host == socket.gethostname()
    assert holder.token == first.held[(0, 1, 2)].token
    assert second.acquire((0, 1, 3))
    first.release((0, 1, 2))
    assert not first.path((0, 1, 2)).exists() and second.acquire((0, 1, 2))
    second.release_all()
    assert second.present() == [] and second.held == {}


def test_a_claim_of_a_dead_process_is_taken_over(tmp_path):
    claims = TileClaims(claims_folder(tmp_path / "c.zarr", "abc"))
    dead = _write_claim(claims, (3, 0, 0), pid=_dead_pid(), started=None)
    assert claims.holder((3, 0, 0)).stale()
    assert claims.acquire((3, 0, 0))
    now = claims.holder((3, 0, 0))
    assert now.pid == os.getpid() and now.token != dead.token
    assert claims.present() == [claims.path((3, 0, 0))]  # nothing of the old claim is left


def test_a_killed_but_unreaped_process_and_a_reused_pid_are_dead(tmp_path):
    claims = TileClaims(claims_folder(tmp_path / "c.zarr", "abc"))
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        stat = Path(f"/proc/{zombie.pid}/stat")
        while time.monotonic() < deadline and stat.read_text().rsplit(")", 1)[1][1] != "Z":
            time.sleep(0.01)
        _write_claim(claims, (0, 0, 0), pid=zombie.pid)
        assert claims.acquire((0, 0, 0))
    finally:
        zombie.wait()
    # this process's pid, but with another start time: a later process that got the pid
    _write_claim(claims, (0, 0, 1), started=(Claim.mine().started or 0) + 1)
    assert claims.acquire((0, 0, 1))
    _write_claim(claims, (0, 0, 2))  # this very process: alive
    assert not claims.acquire((0, 0, 2))


def test_claims_from_another_host_expire_after_the_timeout(tmp_path):
    claims = TileClaims(claims_folder(tmp_path / "c.zarr", "abc"), timeout=60)
    _write_claim(claims, (0, 0, 0), host="elsewhere", pid=1)
    assert not claims.acquire((0, 0, 0))  # cannot check its process: trusted until the timeout
    _write_claim(claims, (0, 0, 1), host="elsewhere", pid=1, time=time.time() - 61)
    assert claims.acquire((0, 0, 1))


def test_an_unreadable_claim_is_trusted_briefly_then_taken_over(tmp_path):
    claims = TileClaims(claims_folder(tmp_path / "c.zarr", "abc"))
    path = claims.path((1, 1, 1))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")  # a writer between creating its claim and filling it
    assert not claims.acquire((1, 1, 1))
    os.utime(path, (time.time() - 60, time.time() - 60))  # ... or one killed right there
    assert claims.acquire((1, 1, 1)) and claims.holder((1, 1, 1)).pid == os.getpid()


def test_a_takeover_that_finds_a_fresh_claim_puts_it_back(tmp_path):
    claims = TileClaims(claims_folder(tmp_path / "c.zarr", "abc"))
    stale = _write_claim(claims, (0, 2, 2), pid=_dead_pid(), started=None)
    # another writer took the stale claim over between our reading and our renaming
    fresh = _write_claim(claims, (0, 2, 2), pid=os.getpid())
    assert not claims._remove_stale(claims.path((0, 2, 2)), stale)
    assert claims.holder((0, 2, 2)).token == fresh.token and claims.present() == [claims.path((0, 2, 2))]


def test_precompute_skips_tiles_claimed_by_a_live_writer_then_takes_them_when_it_dies(
        small_checkpoint, volume, tmp_path, monkeypatch):
    model = load_model(small_checkpoint, device="cpu", dtype="float32")
    emb = Embeddings(zarr.open_array(str(volume), mode="r"), model, tmp_path / "c.zarr", axes="ZYX", tile=TILE,
                     halo=HALO)
    claims = TileClaims(claims_folder(emb.cache_path, emb.store.key))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_claim(claims, (0, 1, 1), pid=other.pid, started=None)
        computed = []
        compute = emb._compute
        monkeypatch.setattr(emb, "_compute", lambda entry: computed.append(entry) or compute(entry))
        gen = emb.precompute(planes=[0])
        reports = [next(gen) for _ in range(9)]  # the first report, then 8 free tiles
        assert [r.entry for r in reports[1:]] == [e for e in emb.entries([0]) if e != (0, 1, 1)]
        assert computed == [r.entry for r in reports[1:]]
        assert claims.holder((0, 1, 1)).pid == other.pid  # not taken from a live writer
        other.kill()
        other.wait()
        last = next(gen)
        assert last.entry == (0, 1, 1) and last.done == last.total == 9 and computed[-1] == (0, 1, 1)
        assert list(gen) == [] and claims.present() == []
    finally:
        other.kill()
        other.wait()


def test_a_cluster_run_skips_claimed_tiles_and_releases_its_own(small_checkpoint, volume, tmp_path):
    pytest.importorskip("distributed")
    model = load_model(small_checkpoint, device="cpu", dtype="float32")
    emb = Embeddings(zarr.open_array(str(volume), mode="r"), model, tmp_path / "c.zarr", axes="ZYX", tile=TILE,
                     halo=HALO)
    claims = TileClaims(claims_folder(emb.cache_path, emb.store.key))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_claim(claims, (4, 2, 0), pid=other.pid, started=None)
        gen = emb.precompute(planes=[4], scheduler="local:1")
        reports = [next(gen) for _ in range(9)]
        assert {r.entry for r in reports[1:]} == set(emb.entries([4])) - {(4, 2, 0)}
        assert not emb.store.present()[4, 2, 0] and claims.present() == [claims.path((4, 2, 0))]
        other.kill()
        other.wait()
        last = next(gen)  # the claim's writer died: computed here
        assert last.entry == (4, 2, 0) and last.done == 9 and emb.store.read((4, 2, 0)) is not None
        assert list(gen) == [] and claims.present() == []
    finally:
        other.kill()
        other.wait()


def test_a_tile_stored_by_another_writer_while_waiting_is_not_computed_again(
        small_checkpoint, volume, tmp_path, monkeypatch):
    model = load_model(small_checkpoint, device="cpu", dtype="float32")
    image = zarr.open_array(str(volume), mode="r")
    emb = Embeddings(image, model, tmp_path / "c.zarr", axes="ZYX", tile=TILE, halo=HALO)
    other = Embeddings(image, model, tmp_path / "c.zarr", axes="ZYX", tile=TILE, halo=HALO)
    claims = TileClaims(claims_folder(emb.cache_path, emb.store.key))
    _write_claim(claims, (2, 0, 0))  # a live writer (this process) holds it
    computed = []
    compute = emb._compute
    monkeypatch.setattr(emb, "_compute", lambda entry: computed.append(entry) or compute(entry))
    gen = emb.precompute(planes=[2])
    for _ in range(9):
        next(gen)
    other.embedding_for(2, (0, 0))  # the other writer stores its tile ...
    claims.path((2, 0, 0)).unlink()  # ... and releases its claim
    last = next(gen)
    assert last.entry == (2, 0, 0) and last.done == 9 and (2, 0, 0) not in computed and len(computed) == 8


def test_a_finished_run_removes_claims_left_by_dead_writers_on_stored_tiles(small_checkpoint, volume, tmp_path):
    model = load_model(small_checkpoint, device="cpu", dtype="float32")
    emb = Embeddings(zarr.open_array(str(volume), mode="r"), model, tmp_path / "c.zarr", axes="ZYX", tile=TILE,
                     halo=HALO)
    claims = TileClaims(claims_folder(emb.cache_path, emb.store.key))
    emb.embedding_for(3, (1, 2))  # stored by a writer killed before it released its claim
    _write_claim(claims, (3, 1, 2), pid=_dead_pid(), started=None)
    claims.path((3, 0, 0)).with_name("3.0.0.stale-0123").write_text("{}")  # a takeover killed midway
    live = _write_claim(claims, (5, 0, 0))  # a live writer elsewhere in the cache
    assert emb.compute_all(planes=[3], progress=False) == 9
    assert claims.present() == [claims.path((5, 0, 0))] and claims.holder((5, 0, 0)).token == live.token


def test_cancelling_releases_the_claims(small_checkpoint, volume, tmp_path):
    model = load_model(small_checkpoint, device="cpu", dtype="float32")
    emb = Embeddings(zarr.open_array(str(volume), mode="r"), model, tmp_path / "c.zarr", axes="ZYX", tile=TILE,
                     halo=HALO)
    claims = TileClaims(claims_folder(emb.cache_path, emb.store.key))
    for report in emb.precompute(planes=[1]):
        if report.done == 3:
            break
    assert claims.present() == [] and emb.store.present().sum() == 3


def test_opening_a_cache_waits_for_another_writer_opening_it(small_checkpoint, volume, tmp_path):
    model = load_model(small_checkpoint, device="cpu", dtype="float32")
    image = zarr.open_array(str(volume), mode="r")
    cache = tmp_path / "new.zarr"
    opened = []
    with cache_lock(cache):  # as a writer in the middle of creating the entries
        thread = threading.Thread(target=lambda: opened.append(
            Embeddings(image, model, cache, axes="ZYX", tile=TILE, halo=HALO)))
        thread.start()
        thread.join(1.0)
        assert thread.is_alive() and not (cache / "zarr.json").exists()
    thread.join(60)
    assert not thread.is_alive() and len(opened) == 1 and (cache / opened[0].store.key / "zarr.json").is_file()


def test_an_in_memory_cache_takes_no_claims(small_checkpoint, volume, tmp_path):
    model = load_model(small_checkpoint, device="cpu", dtype="float32")
    emb = Embeddings(zarr.open_array(str(volume), mode="r"), model, cache=False, axes="ZYX", tile=TILE, halo=HALO)
    assert emb.compute_all(planes=[0], progress=False) == 9 and emb.cache_path is None


# -- two processes -------------------------------------------------------------------------
def test_two_writers_started_together_share_the_tiles_and_match_a_serial_run(small_checkpoint, volume, tmp_path):
    cache = tmp_path / "shared.zarr"
    go = tmp_path / "go"
    logs, ready = [tmp_path / "a.log", tmp_path / "b.log"], [tmp_path / "a.ready", tmp_path / "b.ready"]
    procs = [start_writer(small_checkpoint, volume, cache, log, flag, go) for log, flag in zip(logs, ready)]
    try:
        deadline = time.monotonic() + 120
        while not all(f.exists() for f in ready) and time.monotonic() < deadline:
            assert all(p.exitcode is None for p in procs)
            time.sleep(0.01)
        go.touch()  # both start at once, on a cache that does not exist yet
        for p in procs:
            p.join(180)
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    a, b = (set(logged(log)) for log in logs)
    reference = serial_cache(small_checkpoint, volume, tmp_path / "serial.zarr")
    every = set(reference.entries())
    assert len(every) == 54
    assert a | b == every and a & b == set()
    assert len(logged(logs[0])) == len(a) and len(logged(logs[1])) == len(b)  # nothing computed twice by one
    assert a and b  # both did part of the work
    shared = Embeddings(zarr.open_array(str(volume), mode="r"), load_model(small_checkpoint, dtype="float32"), cache,
                        axes="ZYX", tile=TILE, halo=HALO)
    assert shared.store.key == reference.store.key
    assert np.array_equal(np.asarray(shared.store.checksums[...]), np.asarray(reference.store.checksums[...]))
    assert np.array_equal(np.asarray(shared.store.features[...]), np.asarray(reference.store.features[...]))
    assert TileClaims(claims_folder(cache, shared.store.key)).present() == []


def test_a_writer_kept_waiting_says_who_holds_the_tiles(tmp_path, monkeypatch):
    # a claim of a writer on another host holds its tile until it times out: say so, once
    import napari_sam.core.shared_work as shared_work

    monkeypatch.setattr(shared_work, "SAY_WAITING_AFTER", 0.05)
    claims = TileClaims(tmp_path, timeout=0.4)
    other = dataclasses.replace(Claim.mine(), host="node042", pid=4242, token="t")
    tmp_path.mkdir(exist_ok=True)
    claims.path((0, 1, 2)).write_text(json.dumps(dataclasses.asdict(other)))
    with pytest.warns(UserWarning, match=r"waiting for 1 tile\(s\) .* process 4242 on node042 .* abandoned") as said:
        got = list(shared_work.wait_for([(0, 1, 2)], claims, lambda entry: False, poll=0.02))
    assert got == [((0, 1, 2), True)] and len([w for w in said if "waiting for" in str(w.message)]) == 1
    claims.release((0, 1, 2))
