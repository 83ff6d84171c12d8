"""The core installs and works without napari or Qt (docs/install.md).

A fresh virtual environment gets torch and this checkout *without extras*, the install of
a headless server or a dask worker image. In it: no viewer dependency is importable, every
module outside the viewer parts imports, ``napari-sam embed``/``info``/``segment`` run on
the bundled sample, a ``dask.distributed`` LocalCluster worker embeds the tiles of a Zarr
image, and the viewer parts refuse in one line that gives the pip command.

The environment is built once for the module (about a minute with a warm pip cache). It
needs the package index (and torch from it or from a local wheel directory): if pip
cannot install, the test fails and says so. ``NAPARI_SAM_SKIP_INSTALL_TEST=1`` skips it
where no index is reachable; the checks of :mod:`napari_sam._extras` run regardless.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_sam import _extras

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "napari_sam" / "_data" / "nuclei_2d.tif"
NUCLEUS = (426, 455)  # (x, y) inside a nucleus of the sample (docs/examples/nuclei_2d_prompts.json)
VIEWER_MODULES = ("napari", "qtpy", "magicgui", "vispy", "npe2", "superqt", "PyQt5", "PyQt6", "PySide2", "PySide6")
INSTALL_LINE = 'pip install "napari-sam-scale[napari]"'
SKIP_VARIABLE = "NAPARI_SAM_SKIP_INSTALL_TEST"


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NAPARI_SAM_MODEL", "VIRTUAL_ENV")}
    env["NAPARI_SAM_CACHE_DIR"] = str(tmp / "model-cache")  # nothing is downloaded; nothing lands in the user's cache
    return env


class CoreVenv:
    """A virtual environment holding the core install, and a way to run commands in it."""

    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "venv" / "bin"
        self.work = root / "work"
        self.work.mkdir(exist_ok=True)

    def run(self, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in args]
        if not Path(cmd[0]).is_absolute():
            cmd[0] = str(self.bin / cmd[0])
        return subprocess.run(cmd, cwd=self.work, env=_env(self.root), capture_output=True, text=True,
                              timeout=timeout)

    def python(self, code: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.run("python", "-c", textwrap.dedent(code), *args, timeout=timeout)


def _torch_requirement() -> str:
    # The torch this suite runs on, build tag included (2.13.0+cpu here): a bare "torch" or
    # an open range could fetch a multi-gigabyte CUDA build.
    return f"torch=={importlib.metadata.version('torch')}"


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> Iterator[CoreVenv]:
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(f"{SKIP_VARIABLE}=1: the fresh-venv install of the core is not tested here")
    root = tmp_path_factory.mktemp("core-install")
    made = subprocess.run([sys.executable, "-m", "venv", root / "venv"], capture_output=True, text=True)
    assert made.returncode == 0, f"python -m venv failed: {made.stderr}"
    venv = CoreVenv(root)
    # --no-compile: byte-compiling all of torch takes half the install; imports compile what they use
    pip = venv.run("python", "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-compile",
                   _torch_requirement(), REPO, timeout=1800)
    tail = "\n".join((pip.stdout + pip.stderr).splitlines()[-15:])
    assert pip.returncode == 0, (
        f"pip could not install {_torch_requirement()} and the core of {REPO} into a fresh venv (is the package "
        f"index reachable? where it is not, set {SKIP_VARIABLE}=1 to skip this test):\n{tail}"
    )
    yield venv
    shutil.rmtree(venv.bin.parent, ignore_errors=True)  # over a gigabyte; the outputs in work/ stay


def test_the_core_install_has_no_viewer_dependency(core):
    code = """
        import importlib
        for name in {modules!r}:
            try:
                importlib.import_module(name)
                print(name, "imports")
            except ModuleNotFoundError as err:
                print(name, "absent" if err.name == name else f"broken ({{err.name}} missing)")
    """.format(modules=VIEWER_MODULES)
    out = core.python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{name} absent" for name in VIEWER_MODULES]


def test_every_module_outside_the_viewer_parts_imports(core):
    # Walks the installed package, so a module added later is covered too. A module that
    # needs another extra (bioimage.io model packages) may say so; nothing may need napari.
    code = """
        import importlib, pkgutil, sys
        import napari_sam

        failed = []
        for info in pkgutil.walk_packages(napari_sam.__path__, "napari_sam."):
            if info.name.split(".")[1] in ("_qt", "layers") or info.name.endswith(".__main__"):
                continue  # the viewer parts; a __main__ runs the command line
            try:
                importlib.import_module(info.name)
            except ModuleNotFoundError as err:
                if (err.name or "").split(".")[0] != "bioimageio":
                    failed.append(f"{info.name}: {err!r}")
            except Exception as err:
                failed.append(f"{info.name}: {err!r}")
        print("\\n".join(failed))
        print("imported", sum(m.startswith("napari_sam") for m in sys.modules))
    """
    out = core.python(code, timeout=600)
    assert out.returncode == 0, out.stderr
    *failed, count = out.stdout.strip().splitlines()
    assert failed == []
    assert int(count.split()[1]) > 60  # the walk found the package's modules (about 90 today)
    for package in ("napari_sam.api", "napari_sam.core", "napari_sam.train", "napari_sam.auto",
                    "napari_sam.evaluate", "napari_sam.cli"):
        out = core.python(f"import {package}")
        assert out.returncode == 0, f"import {package}: {out.stderr}"


def test_the_manifest_is_registered_without_napari(core):
    code = """
        import importlib.metadata, importlib.resources
        (ep,) = [e for e in importlib.metadata.entry_points(group="napari.manifest") if e.name == "napari-sam-scale"]
        module, _, name = ep.value.partition(":")
        print(ep.value, importlib.resources.files(module).joinpath(name).is_file())
    """
    out = core.python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["napari_sam:napari.yaml", "True"]


def test_embed_info_and_segment_from_the_command_line(core):
    cache = core.work / "nuclei.sam-embeddings.zarr"
    out = core.run("napari-sam", "embed", SAMPLE, "--model", "default", "--out", cache)
    assert out.returncode == 0, out.stderr
    # the default model embeds these 24-pixel nuclei at 1.25x: tiles of 208 pixels
    assert "4x4 tile(s) per plane (magnification 1.25)" in out.stdout and "16 tile(s) cached" in out.stdout, out.stdout
    out = core.run("napari-sam", "info", cache, "--verify")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "16/16 present" in out.stdout and "0 damaged, 0 missing" in out.stdout, out.stdout

    labels = core.work / "labels.tif"
    out = core.run("napari-sam", "segment", SAMPLE, "--model", "default", "--point", *NUCLEUS, "--out", labels)
    assert out.returncode == 0, out.stderr
    written = tifffile.imread(labels)
    x, y = NUCLEUS
    assert written.shape == tifffile.imread(SAMPLE).shape
    assert written[y, x] == 1 and set(np.unique(written)) == {0, 1}
    assert 200 < int((written == 1).sum()) < 5000  # one nucleus, not the background


WORKER_SCRIPT = """
    import sys

    import tifffile
    import zarr
    from distributed import Client, LocalCluster

    from napari_sam import Embeddings, ImageSource, load_model


    def loaded(name):
        return sorted(m for m in sys.modules if m == name or m.startswith(name + "."))


    if __name__ == "__main__":
        image, cache = sys.argv[1:3]
        # a Zarr image: the worker reads its own tiles, as on a cluster sharing a file system
        array = zarr.create_array(store=image, data=tifffile.imread({sample!r}), chunks=(256, 256))
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \\
                Client(cluster) as client:
            emb = Embeddings(ImageSource(array, "YX"), load_model("default", device="cpu"), cache)
            done = emb.compute_all(scheduler=client, progress=False)
            (worker,) = client.run(loaded, "napari_sam.core.distributed").values()
            (gui,) = client.run(loaded, "napari").values()
        print(done, "x".join(map(str, emb.grid.grid_shape)), ",".join(worker) or "-", ",".join(gui) or "-")
"""


def test_a_local_cluster_worker_embeds_tiles(core):
    script = core.work / "worker_embed.py"
    script.write_text(textwrap.dedent(WORKER_SCRIPT.format(sample=str(SAMPLE))))
    cache = core.work / "worker.sam-embeddings.zarr"
    out = core.run("python", script, core.work / "image.zarr", cache, timeout=600)
    assert out.returncode == 0, out.stderr
    done, grid, worker_modules, gui_modules = out.stdout.split()
    assert (done, grid) == ("16", "4x4")  # at the default model's 1.25x
    assert worker_modules == "napari_sam.core.distributed"  # the tiles were embedded in the worker process
    assert gui_modules == "-"
    out = core.run("napari-sam", "info", cache, "--verify")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "16/16 present" in out.stdout and "verified  16 tile(s) read: 0 damaged, 0 missing" in out.stdout


@pytest.mark.parametrize(
    ("package", "line"),
    [
        ("napari_sam._qt", "the napari plugin (napari_sam._qt) needs napari, magicgui, qtpy, a Qt binding "
         f"(PyQt5, PyQt6, PySide2 or PySide6) (not installed): {INSTALL_LINE}"),
        ("napari_sam.layers", f"napari_sam.layers needs napari (not installed): {INSTALL_LINE}"),
    ],
)
def test_the_viewer_parts_say_what_to_install(core, package, line):
    out = core.python(f"import {package}")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == f"ImportError: {line}"


def test_annotate_without_napari_is_one_line_and_exit_2(core):
    out = core.run("napari-sam", "annotate", "--sample", "nuclei_2d")
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        "napari-sam annotate: error: the viewer needs napari, magicgui, qtpy, a Qt binding (PyQt5, PyQt6, PySide2 "
        f"or PySide6) (not installed): {INSTALL_LINE}"
    ]


# -- the check itself, in this environment (napari installed) with modules hidden -----------


def test_require_names_what_is_missing(monkeypatch):
    _extras.require("the viewer", ("napari", "magicgui", "qtpy"), qt=True)  # all present in the test environment
    monkeypatch.setitem(sys.modules, "napari", None)  # find_spec reports a module set to None as absent
    for binding in _extras.QT_BINDINGS:
        monkeypatch.setitem(sys.modules, binding, None)
    assert _extras.missing(("napari", "magicgui"), qt=True) == [
        "napari", "a Qt binding (PyQt5, PyQt6, PySide2 or PySide6)"
    ]
    with pytest.raises(ImportError) as err:
        _extras.require("napari_sam.layers", ("napari", "magicgui"))
    assert str(err.value) == f"napari_sam.layers needs napari (not installed): {INSTALL_LINE}"
    assert _extras.VIEWER_INSTALL == INSTALL_LINE
