"""The output rule: where a command or the API may write, checked before any work.

An output is never an input (nor inside one, nor around one), its folder must already
exist and accept files, and replacing an existing target is allowed only for the kind of
thing this package writes: a TIFF or .npy file, or a Zarr array that carries our label
marker. A Zarr group, an OME-Zarr image or any other folder is never deleted.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

__all__ = ["LABELS_MARKER", "TIFF_SUFFIXES", "check_file_output", "check_folder_writable", "check_not_an_input",
           "check_output", "is_zarr_path"]

TIFF_SUFFIXES = (".tif", ".tiff")
_LABEL_SUFFIXES = TIFF_SUFFIXES + (".zarr", ".npy")
LABELS_MARKER = {"kind": "labels"}
"""The ``napari_sam`` attribute of every Zarr label array we write (files and
:func:`~napari_sam.core.label_target.create_label_store`): only such a store may be replaced."""


def is_zarr_path(path: Path) -> bool:
    """Whether ``path`` names a Zarr store (by its suffix or its metadata files)."""
    return (
        path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zarray").exists()
        or (path / ".zgroup").exists()
    )


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_not_an_input(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None],
                       what: str = "--out", inside_ok: bool = False) -> None:
    """Refuse an output that is an input, lies inside one or contains one.

    Parameters
    ----------
    output
        Where something will be written (a file, a Zarr store or a cache folder).
    inputs
        The inputs by what they are (``{"image": path, "seeds": path}``); None values are skipped.
    what
        How to name the output in the message (an option such as ``--out``).
    inside_ok
        Allow a new file inside an input folder (a folder of training pairs), though never
        inside a Zarr store.

    Raises
    ------
    ValueError
        Naming both paths.
    """
    out = _resolved(output)
    for name, path in inputs.items():
        if path is None:
            continue
        src = _resolved(path)
        same = out == src or (out.exists() and src.exists() and os.path.samefile(out, src))
        if same:
            relation = "is"
        elif out.is_relative_to(src) and not (inside_ok and src.is_dir() and not is_zarr_path(src)):
            relation = "lies inside"
        elif src.is_relative_to(out):
            relation = "contains"
        else:
            continue
        raise ValueError(f"{what} {output} {relation} the {name} {path}: writing there would destroy an input; "
                         f"choose another path")


def check_folder_writable(folder: str | os.PathLike) -> None:
    """Raise unless ``folder`` exists, is a folder and accepts new files.

    Writability is tested by creating (and removing) a file there: permission bits say
    nothing about read-only mounts, ACLs or the super-user.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"the folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".napari-sam-probe-", dir=folder)
    except OSError as err:
        raise PermissionError(f"cannot write in the folder {folder}: {err.strerror or err}") from None
    os.close(fd)
    os.unlink(probe)


def _is_our_label_store(path: Path) -> bool:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("node_type") == "array" and (meta.get("attributes") or {}).get("napari_sam") == LABELS_MARKER


def _is_our_label_tiff(path: Path) -> bool:
    """Whether a TIFF carries the marker :func:`~napari_sam.core.io.write_labels` puts in its description."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            described = tif.shaped_metadata or ()
    except Exception:  # noqa: BLE001 - unreadable as a TIFF: not ours to replace
        return False
    return any(isinstance(d, dict) and d.get("napari_sam") == LABELS_MARKER for d in described)


def _raise(err: OSError) -> None:
    raise PermissionError(errno.EACCES, "Permission denied (--overwrite cannot replace it)", err.filename) from err


def check_output(path: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None] | None = None,
                 overwrite: bool = False, what: str = "--out") -> Path:
    """Check, before any work, that a label image can be written to ``path``.

    Parameters
    ----------
    path
        Target: ``.tif``/``.tiff``, ``.zarr`` or ``.npy``.
    inputs
        Paths the command reads, by what they are: the target may be none of them, nor
        inside or around one (see :func:`check_not_an_input`).
    overwrite
        Allow replacing an existing target, which must then be of the kind written here:
        a TIFF or Zarr label array written by :func:`~napari_sam.core.io.write_labels` (both carry its marker),
        or a .npy file (which has no room for one).
    what
        How to name the target in messages.

    Returns
    -------
    pathlib.Path
        The target, with ``~`` expanded.

    Raises
    ------
    ValueError
        An unknown suffix, an input as target, or a target that ``overwrite`` may not replace.
    FileExistsError
        The target exists and ``overwrite`` is False.
    FileNotFoundError, NotADirectoryError, PermissionError
        The target's folder is missing, not a folder, or not writable.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in _LABEL_SUFFIXES:
        raise ValueError(f"cannot write labels to {path}: use .tif, .zarr or .npy")
    check_not_an_input(path, inputs or {}, what)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
        if suffix == ".zarr":
            if path.is_symlink():  # a folder under a link cannot be replaced by a rename
                raise ValueError(f"{what} {path} is a symbolic link: give the path it points to")
            if not _is_our_label_store(path):
                raise ValueError(f"{what} {path} exists and is not a label array written by napari-sam (a Zarr "
                                 f"group, an image or another folder): --overwrite never deletes it; remove it "
                                 f"yourself or choose another path")
            # it is moved aside and removed once the new one is whole: every folder in it must
            # let that happen, or the refusal would come after all the work
            for folder, _, _ in os.walk(path, onerror=_raise):
                if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
                    raise PermissionError(errno.EACCES, "Permission denied (--overwrite cannot replace it)", folder)
        elif not path.is_file():
            raise ValueError(f"{what} {path} exists and is not a file: --overwrite replaces only a "
                             f"{suffix} file; remove it yourself or choose another path")
        elif suffix in TIFF_SUFFIXES and not _is_our_label_tiff(path):
            # an image (or labels from elsewhere) under the name: a typo must not destroy it
            raise ValueError(f"{what} {path} exists and is not a label image written by napari-sam: --overwrite "
                             f"never replaces it; remove it yourself or choose another path")
    check_folder_writable(path.parent)
    return path


def check_file_output(path: str | os.PathLike, suffixes: tuple[str, ...], noun: str, what: str = "--out",
                      inputs: Mapping[str, str | os.PathLike | None] | None = None,
                      overwrite: bool | None = False) -> Path:
    """Check, before any work, that a file other than a label image (a checkpoint, a
    report) can be written to ``path``.

    Parameters
    ----------
    path
        The target file.
    suffixes
        The suffixes it may have (the first is named in messages: ``(".pth", ".pt")``).
    noun
        What is written, for messages (``"a checkpoint"``).
    what
        How to name the target in messages (an option, a field).
    inputs
        Paths the work reads: the target may be none of them, nor hold one (it may lie
        inside an input folder; see :func:`check_not_an_input`).
    overwrite
        Whether an existing file may be replaced; None leaves an existing file to the
        caller (a training run that resumes from it).

    Returns
    -------
    pathlib.Path
        The target, with ``~`` expanded.

    Raises
    ------
    ValueError
        Another suffix, an input as target, a folder under the name.
    FileExistsError
        The file exists and ``overwrite`` is False.
    FileNotFoundError, NotADirectoryError, PermissionError
        Its folder is missing, not a folder, or not writable.
    """
    target = Path(path).expanduser()
    if target.suffix.lower() not in suffixes:
        alternatives = "".join(f" (or {s})" for s in suffixes[1:])
        raise ValueError(f"{what} {path}: {noun} is written as a {suffixes[0]}{alternatives} file")
    check_not_an_input(target, inputs or {}, what=what, inside_ok=True)
    if target.exists() and not target.is_file():
        raise ValueError(f"{what} {path} is a folder, not a file: choose another path")
    if target.exists() and overwrite is not None and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it, or choose another "
                              f"{what}")
    check_folder_writable(target.parent)
    return target
