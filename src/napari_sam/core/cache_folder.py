"""The folder of an embedding cache: its root group, opened safely, and the groups of
signatures inside it, listed so that one damaged member cannot hide the others.

:mod:`napari_sam.core.embedding_store` reads and writes the entries of one signature.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import zarr

from .signature import CacheSignature

__all__ = ["FORMAT", "ROOT_ATTR", "delete_group", "entry_keys", "kind", "member_array", "member_group", "open_root",
           "signature_key", "signatures"]

FORMAT = 2
"""Format 2: the checksums of the signature groups it makes cover the group's key and the
tile's place (:mod:`napari_sam.core.embedding_store`). A format-1 cache is read as it is
and marked format 2 when opened for work, so that an older napari-sam, which would judge
every tile of a new group damaged and write it again unplaced, refuses the cache instead."""
READABLE = (1, 2)
ROOT_ATTR = "napari_sam"
"""The root group's attribute that marks a cache: ``{"format": FORMAT}``."""


def open_root(path: str | os.PathLike | None, mode: Literal["r", "r+", "a"]) -> zarr.Group:
    """The cache's root group (a new one in memory for ``path=None``); created when the
    folder is missing or empty and ``mode`` allows. ValueError, naming the folder, for
    anything that is not an embedding cache of this format."""
    if path is None:
        return zarr.open_group(zarr.storage.MemoryStore(), mode="a", zarr_format=3)
    path = Path(path).expanduser()
    if mode == "r" and not path.exists():
        raise FileNotFoundError(f"no embedding cache at {path}: no such folder")
    advice = "" if mode == "r" else ": choose another cache location"  # reading one, there is no location to choose
    # An empty folder (made by hand or by a file dialog) is a fine place for a new cache, and
    # so is what a writer's claims left of a cache removed under it (folders, claim files).
    fresh = not path.exists() or (path.is_dir() and not (path / "zarr.json").exists() and _holds_only_claims(path))
    if fresh and mode == "r":
        raise ValueError(f"{path} is an empty folder, not an embedding cache")
    if not fresh:
        meta = path / "zarr.json"
        try:
            node_type = json.loads(meta.read_text()).get("node_type")
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not an embedding cache (not a Zarr v3 store){advice}") from err
        if node_type != "group":
            raise ValueError(f"{path} is a Zarr {node_type}, not an embedding cache{advice}")
    try:
        if fresh and mode != "r":
            try:
                # One metadata write: a reader never sees the new group without its marker.
                root = zarr.create_group(str(path), attributes={ROOT_ATTR: {"format": FORMAT}}, zarr_format=3)
            except zarr.errors.ContainsGroupError:  # another writer created it first
                root = zarr.open_group(str(path), mode=mode, zarr_format=3)
        else:
            root = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except (OSError, ValueError, KeyError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        where = "" if mode == "r" else (" (another place: --out or --cache, cache= in Python, or "
                                         "$NAPARI_SAM_CACHE_DIR for the default one)")
        raise ValueError(f"cannot open the embedding cache {path}: {why}{where}") from err
    if mode != "r" and ROOT_ATTR not in root.attrs:
        if list(root.keys()):
            raise ValueError(f"{path} is a Zarr group, but not an embedding cache: choose another cache location")
        root.attrs[ROOT_ATTR] = {"format": FORMAT}
    ours = dict(root.attrs).get(ROOT_ATTR, {})
    fmt = ours.get("format") if isinstance(ours, Mapping) else None
    if fmt is None:
        raise ValueError(f"{path} is a Zarr group, but not an embedding cache{advice}")
    if fmt not in READABLE:
        raise ValueError(f"{path} is an embedding cache of format {fmt!r}, made by a newer napari-sam (this one "
                         f"reads formats {', '.join(map(str, READABLE))}): update napari-sam, or choose another "
                         "cache location")
    if mode != "r":
        if fmt != FORMAT:
            root.attrs[ROOT_ATTR] = {"format": FORMAT}
        mark_used(path)
    return root


def _holds_only_claims(folder: Path) -> bool:
    """Whether a folder holds nothing but folders and the claim files of
    :mod:`napari_sam.core.claims` (``<key>/checksums/claims/*``)."""
    return all(not files or "claims" in Path(where).parts for where, _, files in os.walk(folder))


def mark_used(path: str | os.PathLike) -> None:
    """Record that the cache at ``path`` is in use: its root ``zarr.json`` gets the
    current time, which :mod:`napari_sam.core.cache_housekeeping` reads as "last used"
    (an opening for work does this, and a store reading or writing tiles now and then);
    a cache that cannot be written is still read."""
    path = Path(path).expanduser()
    try:
        os.utime(path / "zarr.json")
    except OSError:
        pass


def entry_keys(root: zarr.Group) -> list[str]:
    """The names of the root's subfolders, read from the folder: asking zarr for its groups
    parses every member's metadata, and one damaged file would stop them all."""
    folder = getattr(root.store, "root", None)
    if folder is None:  # in memory: nothing on disk to damage
        return list(root.group_keys())
    return sorted(p.name for p in (Path(folder) / root.path).iterdir() if p.is_dir() and not p.name.startswith("."))


def signature_key(signature: CacheSignature | Mapping) -> str:
    """Short stable name of a signature's group inside a cache (of a signature, or of its JSON)."""
    data = signature.to_json() if isinstance(signature, CacheSignature) else signature
    text = json.dumps(data, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def signatures(root: zarr.Group) -> dict[str, CacheSignature]:
    """The complete entries' groups by key, with their signatures; damaged, unfinished or
    altered groups are left out (the next run that needs one replaces it): a signature
    that is not the one its key was made from, arrays whose shapes or type do not fit."""
    out = {}
    for key in entry_keys(root):
        try:
            group = member_group(root, key)
            data = dict(group.attrs)["signature"]
            if not isinstance(data, Mapping) or signature_key(data) != key:
                raise TypeError(f"signature of {key!r} is not the one its key was made from")
            features, checksums = member_array(group, "features"), member_array(group, "checksums")
            if features.shape[:3] != checksums.shape or str(features.dtype) != data.get("storage"):
                raise ValueError(f"the arrays of {key!r} do not fit each other or the signature")
            out[key] = CacheSignature.from_json(data)
        except (KeyError, ValueError, TypeError):  # a damaged zarr.json is a ValueError (JSONDecodeError)
            continue  # a crashed run's group (no signature yet) or one that lost an array: replaced when needed
    return out


# Zarr returns a member as "array or group"; the cache's layout (embedding_store) fixes which one each is.
def member_array(group: zarr.Group, name: str) -> zarr.Array:
    """``group[name]``, which must be an array."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise ValueError(f"{name!r} in the embedding cache is a group, not an array")
    return node


def member_group(root: zarr.Group, name: str) -> zarr.Group:
    """``root[name]``, which must be a group."""
    node = root[name]
    if not isinstance(node, zarr.Group):
        raise ValueError(f"{name!r} in the embedding cache is an array, not a group")
    return node


def kind(root: zarr.Group, key: str) -> tuple[int, ...]:
    """The shape of one entry of a signature's group: what kind of features it holds."""
    return tuple(int(n) for n in member_array(member_group(root, key), "features").shape[3:])


def delete_group(root: zarr.Group, key: str, path) -> None:
    """Remove one signature's group (on disk: its folder, whatever state it is in)."""
    if path is None:
        del root[key]
    else:
        shutil.rmtree(Path(path).expanduser() / key, ignore_errors=True)
