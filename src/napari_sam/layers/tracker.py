"""Which model propagates objects in a viewer session, and the propagations the dock widget runs.

SAM re-prompts the next plane from the last answer (:mod:`napari_sam.core.propagation`); a
SAM 2.1 carries objects through the stack with its memory
(:class:`~napari_sam.core.memory_labels.Tracking`). A :class:`SessionTracker` holds the
session's choice:

* **Choosing costs nothing.** A SAM 2 named by the registry or a checkpoint file is loaded
  (and, for a registry name, downloaded once, checksum verified) by the first propagation
  that needs it, inside that propagation's generator, so that it runs in the worker thread
  with the rest and reports :class:`Loading` first.
* **Features are kept.** The loaded SAM 2 and its
  :class:`~napari_sam.core.sam2_features.Sam2Features` (in the session's embedding cache)
  stay while the choice does, and return when it is chosen again: propagating again, a
  correction or another object never runs the encoder on a plane twice.
* **Prompted planes are remembered** whichever model is chosen: the planes objects were
  committed on (:meth:`SessionTracker.remember`) and propagated from carry over to every
  SAM 2 the session uses (see :mod:`napari_sam.core.memory_labels`), and to a later
  session on the same Labels layer (they are kept in its metadata).
* **One undo step** per propagation, "all labels" included, also when it is cancelled.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from ..api import Annotator
from ..core.labels import Commit
from ..core.memory_labels import Tracking
from ..model.sam2 import Sam2

__all__ = ["Loading", "SessionTracker", "tracker_name"]


@dataclass(frozen=True)
class Loading:
    """Reported by a propagation before it loads its SAM 2 (the first time it is used).

    Attributes
    ----------
    name
        The model being loaded: a registry name or a checkpoint file's name.
    done, total
        Always 0: loading has no steps to count (a progress bar shows it as busy).
    """

    name: str
    done: int = 0
    total: int = 0


def tracker_name(tracker) -> str:
    """How a tracker is named to the user: ``"SAM"`` for None, a loaded SAM 2's configuration
    name, a registry name, or a checkpoint file's name."""
    if tracker is None:
        return "SAM"
    if isinstance(tracker, Sam2):
        return tracker.config.name
    return os.path.basename(os.fspath(tracker))


class SessionTracker:
    """The model that propagates an annotator's objects, chosen, loaded when needed and kept.

    Parameters
    ----------
    annotator
        The session's :class:`~napari_sam.api.Annotator`. A SAM 2 it was given
        (``tracker=``) is the first choice; else SAM re-prompting is.
    prompted
        Object id -> its prompted planes, kept with the labels (a Labels layer's metadata)
        and updated in place: an earlier session's, or an empty dict.
    """

    def __init__(self, annotator: Annotator, prompted: dict[int, set[tuple[int, ...]]] | None = None):
        self.annotator = annotator
        self.prompted: dict[int, set[tuple[int, ...]]] = {} if prompted is None else prompted
        """Object id -> the planes it was committed on or propagated from (this session's and earlier ones')."""
        given = annotator.tracking
        self._choice = None if given is None else given.model
        self._device = None
        # the SAM 2 last loaded, kept while another choice is tried: (its key, its Tracking)
        self._kept: tuple[tuple, Tracking] | None = None if given is None else ((given.model, None), given)

    # -- the choice ---------------------------------------------------------------------
    @property
    def choice(self):
        """None (SAM re-prompting), a loaded :class:`~napari_sam.model.sam2.Sam2`, a SAM 2.1
        registry name or a checkpoint file."""
        return self._choice

    @property
    def name(self) -> str:
        """:func:`tracker_name` of the choice."""
        return tracker_name(self._choice)

    def choose(self, tracker=None, device: str | None = None) -> None:
        """Propagate with ``tracker`` from now on: None for SAM re-prompting, a loaded
        :class:`~napari_sam.model.sam2.Sam2`, a SAM 2.1 registry name or a checkpoint file
        (loaded by the next propagation: see :attr:`needs_loading`).

        ``device``: where a SAM 2 is loaded (default: the SAM's device).

        Raises
        ------
        ValueError
            For None when the annotator has no SAM to re-prompt.
        """
        if tracker is None and self.annotator.model is None:
            raise ValueError("this session has no SAM to re-prompt: it propagates with its SAM 2 only")
        if tracker is not None and not isinstance(tracker, Sam2):
            tracker = os.fspath(tracker)
        self._choice, self._device = tracker, device
        if tracker is None:
            self._activate(None)
        elif self._kept is not None and self._kept[0] == self._key():
            self._activate(self._kept[1])
        elif isinstance(tracker, Sam2):
            self._activate(self._tracking(tracker))
        else:  # nothing propagates with the earlier SAM 2 until this one is loaded
            self._activate(None)

    @property
    def needs_loading(self) -> bool:
        """Whether the chosen SAM 2 is still to be loaded (slow: it may download)."""
        return self._choice is not None and self.annotator.tracking is None

    def load(self) -> Tracking:
        """Load the chosen SAM 2 and propagate with it (slow: run it in a worker).

        Raises
        ------
        ValueError
            When SAM re-prompting is chosen, or the checkpoint does not load (one line
            saying why: a SAM (1) checkpoint, an unknown name, a missing file...).
        """
        from ..core.sam2_models import load_sam2_model

        if self._choice is None:
            raise ValueError("SAM re-prompting is chosen: there is no SAM 2 to load")
        if not self.needs_loading:
            return self.annotator.tracking
        model = load_sam2_model(self._choice, self._device or self._sam_device())
        return self._activate(self._tracking(model))

    def remember(self, commit: Commit | None) -> None:
        """The plane of a commit is a prompted plane of the objects it wrote."""
        if commit is None:
            return
        for i in commit.ids:
            if i:
                self.prompted.setdefault(int(i), set()).add(tuple(commit.plane))

    # -- propagations ---------------------------------------------------------------------
    def selected(self, plane: tuple[int, ...], label_id: int, axis: str | None = None, settings=None,
                 overwrite: bool = False) -> Iterator:
        """Propagate object ``label_id`` from ``plane`` through the stack, both ways (see
        :meth:`napari_sam.api.Annotator.propagate`: with a SAM 2, ``plane`` becomes one of
        the object's prompted planes and a correction there re-propagates the planes it owns).

        Yields :class:`Loading` first when the SAM 2 is still to be loaded, then
        :class:`~napari_sam.core.propagation.PropagationStep` per plane. Closing the
        generator stops it; what was written stays, as one undo step.

        Raises
        ------
        ValueError
            (from the first step) For label 0, an object not on ``plane``, a SAM 2 that
            does not load.
        """
        if label_id < 1:
            raise ValueError(f"label {label_id} is the background: choose an object's id to propagate")
        yield from self._load_steps()
        yield from self.annotator.propagate(plane, label_id, axis, settings, overwrite)

    def all(self, axis: str | None = None, settings=None, overwrite: bool = False, ids=None) -> Iterator:
        """Propagate every object of the labels (or those in ``ids``), as one undo step: with
        a SAM 2 all at once from their prompted planes (else from the plane where each is
        largest); with SAM each from its largest plane in turn
        (:meth:`napari_sam.api.Annotator.propagate_all_steps`).

        Yields :class:`Loading` first when the SAM 2 is still to be loaded, then the steps
        (:class:`~napari_sam.core.memory_propagation.MemoryStep` with a SAM 2,
        :class:`~napari_sam.core.propagation.PropagationStep` with SAM).

        Raises
        ------
        ValueError
            When the labels hold no objects (raised by the first step).
        """
        yield from self._load_steps()
        with self.annotator.writer.one_step():
            yield from self.annotator.propagate_all_steps(axis, ids, settings, overwrite)

    # -- helpers --------------------------------------------------------------------------
    def _load_steps(self) -> Iterator[Loading]:
        if self.needs_loading:
            yield Loading(self.name)
            self.load()

    def _key(self) -> tuple:
        return (self._choice, self._device)

    def _sam_device(self):
        return None if self.annotator.model is None else self.annotator.model.device

    def _tracking(self, model: Sam2) -> Tracking:
        """A Tracking of the annotator's image with ``model``, its features cached where the
        SAM's embeddings are (memory only when those are)."""
        base = self.annotator.tracking if self.annotator.model is None else None
        if base is not None:
            cache, normalization = base.cache, base.normalization
        else:
            embeddings = self.annotator.embeddings
            cache = False if embeddings.cache_path is None else embeddings.cache_path
            normalization = embeddings.normalization
        return Tracking(self.annotator.source, model, cache, normalization)

    def _activate(self, tracking: Tracking | None) -> Tracking | None:
        """Propagate with ``tracking`` (None: SAM); the prompted planes carry over."""
        current = self.annotator.tracking
        if current is not None:  # the planes it propagated from
            for oid, planes in current.prompted.items():
                self.prompted.setdefault(oid, set()).update(planes)
        if tracking is not None:  # one set of prompted planes, where the labels keep it
            for oid, planes in tracking.prompted.items():
                self.prompted.setdefault(oid, set()).update(planes)
            tracking.prompted = self.prompted
            self._kept = (self._key(), tracking)
        self.annotator.tracking = tracking
        return tracking
