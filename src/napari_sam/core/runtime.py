"""The process-wide settings the package makes for speed, applied by one explicit call.

:func:`configure_runtime` is that call; :func:`~napari_sam.core.models.load_model` makes
it, so every model loaded by name or file runs under the same settings. A model built in
memory (``build_sam``, tests) runs without them until the call is made. Two settings:

**The allocator.** glibc serves allocations above a dynamic threshold (128 KiB to start with) with fresh
``mmap`` pages and unmaps them on free. An interactive click allocates and frees a few
dozen 1-16 MiB tensors, so every click pays for tens of thousands of page faults and
zero-filled pages: on the 2-core VMs we measured, that was about a quarter of the
click-to-mask time. The image encoder's temporaries (50 MiB MLP activations, 64 MiB
attention biases) pay the same again on every block. Serving every allocation from the
heap (no mmap) and trimming the heap only past 1 GiB of free space keeps those blocks
for reuse: about 10% off the encoder and 20% off a click. The cost is that freed memory
up to that limit stays with the process; the peak is unchanged.

It takes effect only once, and only where glibc is the allocator.

**The oneDNN route** for large CPU matrix products (:mod:`napari_sam.model.matmul`):
on where it was measured faster (AMD x86-64), unless ``NAPARI_SAM_ONEDNN`` is ``1`` (on
anywhere) or ``0`` (off).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass

from ..model import matmul

__all__ = ["ONEDNN_ENV_VAR", "RuntimeSettings", "configure_runtime", "keep_freed_memory_for_reuse", "onednn_wanted"]

ONEDNN_ENV_VAR = "NAPARI_SAM_ONEDNN"
"""``1``: the oneDNN route on whatever the processor; ``0``: off; unset: where measured."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1024 * 1024 * 1024
_done: bool | None = None


def keep_freed_memory_for_reuse() -> bool:
    """Tune glibc malloc for many mid-sized tensors; returns whether it took effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _done


def onednn_wanted(setting: str | None) -> bool:
    """Whether the oneDNN route should be on, given the value of :data:`ONEDNN_ENV_VAR`:
    ``"1"`` on, ``"0"`` off, anything else: where it was measured faster."""
    setting = (setting or "").strip()
    return setting == "1" or (setting != "0" and matmul.faster_here())


@dataclass(frozen=True)
class RuntimeSettings:
    """What :func:`configure_runtime` applied.

    Attributes
    ----------
    allocator
        glibc keeps freed blocks for reuse.
    onednn
        Large CPU matrix products go through oneDNN (when its probe passes).
    """

    allocator: bool
    onednn: bool


def configure_runtime(onednn: bool | None = None) -> RuntimeSettings:
    """Apply the package's process-wide settings (see the module docstring); idempotent.

    Parameters
    ----------
    onednn
        Force the oneDNN route on or off; None reads :data:`ONEDNN_ENV_VAR`, then the
        processor.

    Returns
    -------
    RuntimeSettings
    """
    matmul.enabled = onednn_wanted(os.environ.get(ONEDNN_ENV_VAR)) if onednn is None else bool(onednn)
    return RuntimeSettings(keep_freed_memory_for_reuse(), matmul.enabled)
