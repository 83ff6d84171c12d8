"""Labels on disk survive a kill: a process is SIGKILLed at every (or at seeded random)
store writes of a commit, an undo, a propagation and the CLI's final write; the store
left behind is reopened and must be consistent, and resuming must give the result of an
uninterrupted run bit for bit.

The kills are deterministic: the child counts Zarr's file writes and deletes (``_put``
and ``delete`` of the local store, one per chunk or metadata file) and kills itself
before the chosen one. To pay
for the imports once, a single child process imports everything and forks one grandchild
per kill point.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from napari_sam.core.label_target import create_label_store
from napari_sam.core.labels import LabelWriter
from napari_sam.core.masks import PlaneMask

SHAPE = (10, 64, 64)
CHUNKS = (32, 32)  # every object below spans the four chunks of its planes
JOURNAL = ".napari_sam_pending.npz"

_SERVER = r"""
import json, os, shutil, signal, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import zarr.storage._local as local
import importlib
import test_label_faults as t

plan = json.loads(sys.argv[2])
for name in plan["preload"]:  # imported once here, not in every fork
    importlib.import_module(name)

original, original_delete = local._put, local.LocalStore.delete


def runs():
    yield from plan["runs"]
    then = plan.get("then")
    if then:
        # kill points among the writes that the first (uninterrupted) run made
        with open(plan["runs"][0]["path"] + ".puts") as f:
            writes = int(f.read())
        points = range(1, writes + 1)
        if then.get("random"):
            rng = np.random.default_rng(then["seed"])
            points = sorted(rng.choice(np.arange(1, writes + 1), then["random"], replace=False).tolist())
        for k in points:
            path = os.path.join(os.path.dirname(then["base"]), f"run{k}.zarr")
            shutil.copytree(then["base"], path)
            yield {"path": path, "kill_at": int(k)}


for run in runs():
    pid = os.fork()
    if pid == 0:
        count = [0]

        def _tick(path, _kill=run["kill_at"], _under=os.path.dirname(run["path"]) + os.sep):
            if not plan["only_beside"] or str(path).startswith(_under):
                count[0] += 1
                if count[0] == _kill:
                    os.kill(os.getpid(), signal.SIGKILL)

        def _put(path, value, exclusive=False):
            _tick(path)
            return original(path, value, exclusive)

        async def _delete(self, key):  # a chunk that becomes all background is deleted
            _tick(self.root / key)
            return await original_delete(self, key)

        local._put, local.LocalStore.delete = _put, _delete
        try:
            code = getattr(t, plan["scenario"])(run["path"], *plan.get("args", []))
            with open(run["path"] + ".puts", "w") as f:
                f.write(str(count[0]))
        except BaseException:
            import traceback

            traceback.print_exc()
            os._exit(1)
        os._exit(code or 0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    outcome = "killed" if killed else f"exit {os.waitstatus_to_exitcode(status)}"
    print(json.dumps([run["path"], run["kill_at"], outcome]))
"""


def _serve(scenario, runs, args=(), only_beside=False, then=None, preload=()):
    """Run ``scenario(path, *args)`` once per ``(path, kill_at)`` in a forked child that
    is killed before its ``kill_at``-th Zarr write (0: never; with ``only_beside``, only
    writes in the folder of ``path`` count). ``then``: afterwards, kill a copy of the
    store ``then["base"]`` at each write the first run made (or at ``then["random"]`` of
    them, drawn with ``then["seed"]``). ``preload``: modules imported before forking.
    Returns ``(path, kill_at, "killed" or "exit N")`` per run."""
    plan = {"scenario": scenario, "args": list(args), "only_beside": only_beside, "then": then,
            "preload": list(preload),
            "runs": [{"path": str(p), "kill_at": k} for p, k in runs]}
    done = subprocess.run([sys.executable, "-c", _SERVER, str(Path(__file__).parent), json.dumps(plan)],
                          capture_output=True, text=True, timeout=240)
    print(done.stderr[-3000:])  # shown when a test fails
    assert done.returncode == 0
    return [(Path(p), k, status) for p, k, status in (json.loads(line) for line in done.stdout.splitlines()
                                                      if line.startswith("["))]


def _obj(y0, y1, x0, x1):
    return PlaneMask((y0, y1, x0, x1), np.ones((y1 - y0, x1 - x0), bool), 0.9, ())


def _ball():
    """Object 1 of the ground truth: a ball through planes 1-8 across all four chunks;
    object 2: a square on plane 6 that propagation must leave alone."""
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    gt = np.zeros(SHAPE, np.uint16)
    gt[((z - 4.5) / 4) ** 2 + ((y - 32) / 24) ** 2 + ((x - 32) / 24) ** 2 <= 1] = 1
    gt[6, 1:5, 1:5] = 2
    return gt


def _annotator(path):
    """The API's Annotator on a label store at ``path``, with SAM replaced by an exact
    segmenter (tests/core/test_propagation.py) so that no model is loaded."""
    from test_propagation import ExactEmbeddings

    from napari_sam.api import Annotator
    from napari_sam.core.image_source import ImageSource

    ann = Annotator.__new__(Annotator)
    ann.source = ImageSource(np.zeros(SHAPE, np.uint8), "ZYX")
    ann.embeddings = ExactEmbeddings(_ball())
    ann.writer = LabelWriter(create_label_store(path, SHAPE, chunks=CHUNKS))
    return ann


# -- scenarios, run in the killed child and again in the test to resume -------------------
def commit_undo(path):
    writer = LabelWriter(create_label_store(path, SHAPE, chunks=CHUNKS))
    writer.commit((4,), [_obj(10, 40, 10, 40), _obj(30, 60, 30, 60)])
    writer.undo()


def propagate(path):
    from napari_sam.core.propagation import PropagationSettings

    ann = _annotator(path)
    list(ann.propagate(4, 1, settings=PropagationSettings(min_consecutive_iou=0.0, min_area=1)))


def reopen(path):
    LabelWriter(create_label_store(path, SHAPE, chunks=CHUNKS))


def cli_propagate(path, image, seeds, model):
    """``napari-sam propagate`` into ``path``, replacing it if it is there."""
    from napari_sam.cli import main

    cache = str(Path(path).parent.parent / "cache.zarr")  # outside --out's folder, whose writes are counted
    return main(["propagate", image, seeds, "--model", model, "--dtype", "float32", "--out", path,
                 "--cache", cache] + (["--overwrite"] if os.path.exists(path) else []))


# -- checks ------------------------------------------------------------------------------
def _state(path):
    arr = zarr.open_array(str(path), mode="r")
    return np.asarray(arr[...]), int(arr.attrs["napari_sam_max_id"])


def _consistent(path):
    """The invariants, before and after a writer reopens the store: every id present is
    recorded, the next id is free, no note of a write in progress is left."""
    pixels, recorded = _state(path)  # as the kill left it: zarr.json readable, ids recorded
    assert pixels.max() <= recorded
    writer = LabelWriter(create_label_store(path, SHAPE, chunks=CHUNKS))
    pixels, recorded = _state(path)
    assert pixels.max() <= recorded == writer.max_id()
    assert not (pixels == writer.next_id()).any()
    assert not (Path(path) / JOURNAL).exists()
    return writer, pixels, recorded


@pytest.fixture
def base(tmp_path):
    """A store with earlier work: object 3 on plane 2 (so the next id is 4)."""
    path = tmp_path / "base.zarr"
    writer = LabelWriter(create_label_store(path, SHAPE, chunks=CHUNKS))
    writer.commit((2,), [_obj(0, 10, 0, 10)], ids=[3])
    return path


def test_a_commit_or_undo_killed_at_any_write_is_whole_or_absent_after_reopening(base, tmp_path):
    before, _ = _state(base)
    committed = before.copy()
    committed[4, 10:40, 10:40] = 4
    committed[4, 30:60, 30:60] = np.where(committed[4, 30:60, 30:60] == 0, 5, committed[4, 30:60, 30:60])
    clean = tmp_path / "clean.zarr"
    shutil.copytree(base, clean)
    runs = _serve("commit_undo", [(clean, 0)], then={"base": str(base)})
    assert runs[0][2] == "exit 0" and np.array_equal(_state(clean)[0], before) and _state(clean)[1] == 5
    # the new ids, four chunks, then the same four chunks back (deleted: all background)
    assert [k for _, k, _ in runs[1:]] == list(range(1, 10))
    outcomes = []
    for run, k, status in runs[1:]:
        assert status == "killed"
        writer, pixels, recorded = _consistent(run)
        # a killed commit is rolled back (its ids free again); a killed undo leaves the commit
        outcomes.append("committed" if np.array_equal(pixels, committed) else "absent")
        expected = (committed, 5) if outcomes[-1] == "committed" else (before, 3)
        assert np.array_equal(pixels, expected[0]) and recorded == expected[1], f"kill at write {k}"
        assert writer.history == ()  # the undo history lived in memory: absent, not partial
    assert outcomes == ["absent"] * 5 + ["committed"] * 4


def test_a_rollback_killed_itself_is_finished_by_the_next_reopen(base, tmp_path):
    before, _ = _state(base)
    run = tmp_path / "run.zarr"
    shutil.copytree(base, run)
    # killed with the ids recorded and one chunk of four written, then killed again in
    # the first write of the rollback
    assert [s for _, _, s in _serve("commit_undo", [(run, 3)])] == ["killed"]
    assert (run / JOURNAL).exists()
    assert [s for _, _, s in _serve("reopen", [(run, 1)])] == ["killed"]
    assert (run / JOURNAL).exists()
    _, pixels, recorded = _consistent(run)
    assert np.array_equal(pixels, before) and recorded == 3


def test_a_propagation_killed_at_ten_random_writes_resumes_to_the_uninterrupted_result(base, tmp_path):
    gt = _ball()
    seed = gt[4] == 1
    rows, cols = np.flatnonzero(seed.any(1)), np.flatnonzero(seed.any(0))
    start = PlaneMask((rows[0], rows[-1] + 1, cols[0], cols[-1] + 1),
                      seed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], 1.0, ())
    writer = LabelWriter(create_label_store(base, SHAPE, chunks=CHUNKS))
    writer.commit((4,), [start], ids=[1])
    writer.commit((6,), [_obj(1, 5, 1, 5)], ids=[2])
    before, _ = _state(base)
    clean = tmp_path / "clean.zarr"
    shutil.copytree(base, clean)
    runs = _serve("propagate", [(clean, 0)], then={"base": str(base), "random": 10, "seed": 0},
                  preload=["napari_sam.api", "test_propagation"])
    reference, ref_max = _state(clean)
    assert runs[0][2] == "exit 0" and ref_max == 3
    assert np.array_equal(reference == 1, gt == 1) and (reference[6, 1:5, 1:5] == 2).all()
    assert int(Path(f"{clean}.puts").read_text()) >= 20 and len(runs) == 11
    for run, k, status in runs[1:]:
        assert status == "killed"
        _, pixels, recorded = _consistent(run)
        assert recorded == 3
        for z in range(SHAPE[0]):  # every plane is as before or as finished, never half
            assert np.array_equal(pixels[z], before[z]) or np.array_equal(pixels[z], reference[z]), (k, z)
        propagate(str(run))  # resume: the same call again
        assert np.array_equal(_state(run)[0], reference), f"resumed after a kill at write {k}"


def test_cli_propagate_killed_while_writing_leaves_no_half_file_under_out(tmp_path, tiny_checkpoint):
    import tifffile

    from napari_sam.core.io import write_labels

    gt = _ball()[3:6, 16:48, 16:48]  # three small planes: quick for the tiny model
    tifffile.imwrite(tmp_path / "vol.tif", (gt * 100).astype(np.uint8), photometric="minisblack")
    seeds = np.zeros(gt.shape, np.uint16)
    seeds[1][gt[1] == 1] = 1
    tifffile.imwrite(tmp_path / "seeds.tif", seeds, photometric="minisblack")
    fresh, replaced = tmp_path / "a" / "out.zarr", tmp_path / "b" / "out.zarr"
    for folder in (fresh.parent, replaced.parent):
        folder.mkdir()
    earlier = np.zeros(gt.shape, np.uint32)
    earlier[0, :3, :3] = 7
    write_labels(replaced, earlier)  # an earlier result of napari-sam, to be replaced
    args = [str(tmp_path / "vol.tif"), str(tmp_path / "seeds.tif"), str(tiny_checkpoint)]
    # only writes in --out's folder count: the first is the array's metadata, the second a
    # chunk; the second run replaces the earlier result (--overwrite)
    runs = _serve("cli_propagate", [(fresh, 2), (replaced, 2)], args, only_beside=True,
                  preload=["napari_sam.api", "napari_sam.cli.segment"])
    assert [status for _, _, status in runs] == ["killed", "killed"]
    assert not fresh.exists()
    assert np.array_equal(np.asarray(zarr.open_array(str(replaced), mode="r")[...]), earlier)  # still whole


def test_numpy_labels_have_no_note_and_a_failed_write_is_rolled_back(tmp_path, monkeypatch):
    assert LabelWriter(np.zeros((3, 8, 8), np.uint8))._journal is None
    store = create_label_store(tmp_path / "l.zarr", (2, 64, 64), chunks=(32, 32))
    writer = LabelWriter(store)
    writer.commit((0,), [_obj(0, 5, 0, 5)])
    import zarr.storage._local as local

    original, calls = local._put, SimpleNamespace(n=0)

    def failing(path, value, exclusive=False):
        # one named chunk of plane 1 fails: zarr writes chunks concurrently, so a count of
        # calls would land on a different write from run to run
        calls.n += 1
        if str(path).replace("\\", "/").endswith("c/1/1/1"):
            raise OSError(28, "No space left on device")
        return original(path, value, exclusive)

    monkeypatch.setattr(local, "_put", failing)
    with pytest.raises(OSError, match="No space left"):
        writer.commit((1,), [_obj(10, 60, 10, 60)])
    monkeypatch.setattr(local, "_put", original)
    assert not np.asarray(store[1]).any() and writer.max_id() == 1 and store.attrs["napari_sam_max_id"] == 1
    assert not (tmp_path / "l.zarr" / JOURNAL).exists()
    assert writer.commit((1,), [_obj(10, 60, 10, 60)]).ids == (2,)


def test_a_note_left_by_a_living_process_or_another_machine_is_not_rolled_back(base, monkeypatch):
    from napari_sam.core import label_journal as journal
    from napari_sam.core.claims import process_start

    before, _ = _state(base)
    writer = LabelWriter(create_label_store(base, SHAPE, chunks=CHUNKS))
    parent = os.getppid()  # alive: its write may be in progress
    journal.write_note(base / JOURNAL, (4,), (0, 4, 0, 4), np.ones((4, 4), np.uint32), 3)
    note = dict(np.load(base / JOURNAL))
    np.savez(base / JOURNAL, **{**note, "pid": np.int64(parent), "started": np.int64(process_start(parent) or -1)})
    with pytest.raises(ValueError, match="is writing these labels now"):  # one writer at a time
        LabelWriter(create_label_store(base, SHAPE, chunks=CHUNKS))
    assert np.array_equal(_state(base)[0], before) and (base / JOURNAL).exists()
    # the same pid started at another time: a dead writer whose pid was reused
    np.savez(base / JOURNAL, **{**note, "pid": np.int64(parent), "started": np.int64(12345)})
    assert LabelWriter(create_label_store(base, SHAPE, chunks=CHUNKS)).recovered
    journal.write_note(base / JOURNAL, (4,), (0, 4, 0, 4), np.ones((4, 4), np.uint32), 3)
    monkeypatch.setattr(journal.socket, "gethostname", lambda: "elsewhere")
    with pytest.raises(ValueError, match="did not finish"):
        LabelWriter(create_label_store(base, SHAPE, chunks=CHUNKS))
    monkeypatch.undo()
    (base / JOURNAL).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is damaged"):
        LabelWriter(create_label_store(base, SHAPE, chunks=CHUNKS))
    assert writer.max_id() == 3


def test_a_second_writer_of_this_process_does_not_undo_a_write_in_progress(base):
    from napari_sam.core import label_journal as journal

    first = LabelWriter(create_label_store(base, SHAPE, chunks=CHUNKS))
    before, _ = _state(base)
    journal.write_note(first._journal, (4,), (0, 4, 0, 4), np.ones((4, 4), np.uint32), 3)
    journal._WRITING.add(str(first._journal))  # as while ``first`` writes in a worker thread
    try:
        with pytest.raises(ValueError, match="is writing these labels now"):
            LabelWriter(create_label_store(base, SHAPE, chunks=CHUNKS))
        assert np.array_equal(_state(base)[0], before) and first._journal.exists()
    finally:
        journal._WRITING.discard(str(first._journal))
    # no write of this process is in progress: a note naming our pid is a dead process's
    assert LabelWriter(create_label_store(base, SHAPE, chunks=CHUNKS)).recovered


def test_labels_that_cannot_be_written_are_refused_in_one_line():
    import dask.array as da

    from napari_sam.core.label_target import open_labels

    for labels, kind in ((da.zeros((4, 6), dtype="uint32"), "dask.Array"), (((0,) * 6,) * 4, "builtins.tuple")):
        with pytest.raises(ValueError, match=f"labels of type {kind} cannot be written"):
            open_labels(labels, (4, 6))
    assert open_labels(np.zeros((4, 6), np.uint32), (4, 6)).shape == (4, 6)
