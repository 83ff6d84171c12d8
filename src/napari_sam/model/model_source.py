"""Where a loaded model came from: enough to tell whether cached embeddings fit it."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

__all__ = ["ModelSource", "file_sha256", "file_stat"]


@dataclass
class ModelSource:
    """Where a loaded model came from: enough to tell whether cached embeddings fit it.

    Attributes
    ----------
    name
        Registry name, or the checkpoint's file name for a local file.
    path
        The checkpoint file.
    dtype
        Encoder precision name.
    stat
        ``(size, mtime_ns, inode)`` of the file taken before its weights were read
        (:func:`file_stat`); None when unknown.
    """

    name: str
    path: str
    dtype: str
    stat: tuple[int, int, int] | None = None
    _checksum: str | None = field(default=None, repr=False)

    @property
    def checksum(self) -> str:
        """sha256 of the checkpoint file (computed once, on first use).

        Raises
        ------
        ValueError
            When the file changed since the weights were read from it (replaced by a newer
            model, say): its hash would sign caches with embeddings of other weights.
        """
        if self._checksum is None:
            self._check_unchanged()
            digest = file_sha256(self.path)
            self._check_unchanged()  # nor while it was read
            self._checksum = "sha256:" + digest
        return self._checksum

    def _check_unchanged(self) -> None:
        if self.stat is not None and file_stat(self.path) != self.stat:
            raise ValueError(f"{self.path} changed on disk since the model was loaded from it: load it again (its "
                             "embeddings would be cached under the new file's name)")


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, as hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_stat(path) -> tuple[int, int, int] | None:
    """``(size, mtime_ns, inode)`` of a file: what changes when it is rewritten or replaced."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)
