"""The propagation controls of the annotation dock widget: which model propagates, and the
buttons that propagate the selected label or all of them.

"Propagate with" offers SAM re-prompting (the default: SAM answers each next plane from the
last answer), the SAM 2.1 models of the registry and a SAM 2.1 checkpoint file; a SAM 2
loaded beforehand (from the console, or a test's small model) is added by
:meth:`TrackingControls.choose`. The session side is
:class:`~napari_sam.layers.tracker.SessionTracker`: nothing is loaded when a model is
picked; the first propagation with it loads it in the worker (a registry model not yet in
the cache is downloaded once, checksum verified, after the user said yes), with a progress
bar and Cancel, and later propagations reuse the model and its cached features.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from magicgui.widgets import ComboBox, FileEdit, PushButton

from ..layers import ViewerSession
from ..layers.tracker import Loading, tracker_name
from ..model.sam2 import Sam2
from ..weights import REGISTRY, checkpoint_path, list_models

__all__ = ["SAM", "SAM2_FILE", "TrackingControls", "tracker_choices"]

SAM = "SAM (re-prompting)"
SAM2_FILE = "SAM 2.1 checkpoint file..."


def tracker_choices(loaded=()) -> list[tuple[str, object]]:
    """The "propagate with" entries as (text, value): SAM re-prompting, the registry's SAM 2.1
    models, the SAM 2s in ``loaded`` (loaded models), then a checkpoint file."""
    return ([(SAM, SAM)] + [(e.name, e.name) for e in list_models("sam2")]
            + [(f"{m.config.name} (loaded)", m) for m in loaded] + [(SAM2_FILE, SAM2_FILE)])


def _to_download(spec) -> str:
    """For a registry name whose file is not in the cache yet, its size in words; else ""."""
    if not isinstance(spec, str) or spec not in REGISTRY or checkpoint_path(spec).is_file():
        return ""
    size = REGISTRY[spec].size_bytes
    return f"{size / 1e6:.0f} MB" if size else "size unknown"


def _plane_text(plane) -> str:
    plane = tuple(int(p) for p in plane)
    return str(plane[0]) if len(plane) == 1 else str(plane)


def ask(parent, text: str) -> bool:
    """A yes/no question in a dialog (modal: the answer is needed before anything starts)."""
    from qtpy.QtWidgets import QMessageBox

    answer = QMessageBox.question(parent, "napari-sam", text, QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
    return answer == QMessageBox.Yes


class TrackingControls:
    """The "propagate with" choice and the propagation buttons of a dock widget.

    Parameters
    ----------
    workers
        The widget's :class:`~napari_sam._qt.workers.Workers`.
    say
        Shows one line of status.
    session
        Returns the widget's current :class:`~napari_sam.layers.ViewerSession` (or None).
    parent
        The Qt widget that owns the download question.

    Attributes
    ----------
    widgets : list
        The magicgui widgets, for the dock widget to lay out in its column.
    confirm : callable
        ``confirm(question) -> bool``: asked before a registry model is downloaded.
    """

    def __init__(self, workers, say: Callable[[str], None], session: Callable[[], ViewerSession | None], parent=None):
        self.workers, self._say, self._session, self._parent = workers, say, session, parent
        self._loaded: list[Sam2] = []
        self._stack = False
        self.tracker = ComboBox(
            label="propagate with", choices=tracker_choices(), value=SAM,
            tooltip="SAM (re-prompting): each next slice is prompted from the last answer. SAM 2.1: objects are "
            "carried with its memory of the slices done (downloaded once when first used, after you confirm: "
            + ", ".join(f"{e.name} {e.size_bytes / 1e6:.0f} MB" for e in list_models("sam2") if e.size_bytes)
            + "), or a SAM 2.1 checkpoint file")
        self.checkpoint = FileEdit(label="SAM 2 checkpoint", mode="r", filter="*.pt *.pth", visible=False,
                                   tooltip="a SAM 2.1 checkpoint in Meta's layout ({'model': state_dict})")
        self.selected = PushButton(text="Propagate selected label through slices", enabled=False,
                                   tooltip="follow the labels layer's selected object from this slice up and down "
                                   "the stack; with SAM 2, propagating again from a slice you corrected redoes the "
                                   "slices nearer to it than to the object's other prompted slices")
        self.all = PushButton(text="Propagate all labels", enabled=False,
                              tooltip="follow every object of the labels through the stack (SAM 2: all at once, "
                              "from the slices they were committed or corrected on; SAM: one by one, from the "
                              "slice where each is largest); one undo step")
        self.widgets = [self.tracker, self.checkpoint, self.selected, self.all]
        self.confirm: Callable[[str], bool] = lambda question: ask(self._parent, question)
        self.tracker.changed.connect(self._changed)
        self.selected.clicked.connect(lambda: self.run_selected())
        self.all.clicked.connect(lambda: self.run_all())

    # -- the choice ---------------------------------------------------------------------
    def attach(self, session: ViewerSession) -> None:
        """A session started: the buttons work on stacks; a SAM 2 it came with is chosen."""
        self._stack = bool(session.annotator.source.plane_axes)
        self.selected.enabled = self.all.enabled = self._stack
        if isinstance(session.tracker.choice, Sam2):
            self.choose(session.tracker.choice)

    def choose(self, tracker) -> None:
        """Select what propagates: ``None`` or ``"sam"`` for SAM re-prompting, a SAM 2.1
        registry name, a checkpoint file, or a loaded :class:`~napari_sam.model.sam2.Sam2`
        (added to the choices)."""
        if tracker is None or (isinstance(tracker, str) and tracker.lower() == "sam"):
            self.tracker.value = SAM
        elif isinstance(tracker, Sam2):
            if not any(m is tracker for m in self._loaded):
                self._loaded.append(tracker)
                self.tracker.choices = ()  # emptied first: new choices are appended, not put in order
                self.tracker.choices = tracker_choices(self._loaded)
            self.tracker.value = tracker
        elif os.fspath(tracker) in REGISTRY:
            self.tracker.value = os.fspath(tracker)
        else:
            self.tracker.value = SAM2_FILE
            self.checkpoint.value = os.fspath(tracker)

    def spec(self):
        """The chosen tracker: None (SAM), a registry name, a checkpoint file's path or a
        loaded SAM 2.

        Raises
        ------
        ValueError
            When the checkpoint file entry is chosen without an existing file.
        """
        value = self.tracker.value
        if value == SAM:
            return None
        if isinstance(value, str) and value == SAM2_FILE:
            path = str(self.checkpoint.value)
            if not path or path == "." or not os.path.isfile(path):
                raise ValueError("choose a SAM 2.1 checkpoint file")
            return path
        return value

    def _changed(self, value) -> None:
        if value is None:  # the choices being replaced
            return
        file = isinstance(value, str) and value == SAM2_FILE
        self.checkpoint.visible = file
        size = _to_download(value)
        if value == SAM:
            self._say("propagation re-prompts SAM slice by slice")
        elif file:
            self._say("choose a SAM 2.1 checkpoint file: it loads at the first propagation")
        elif size:
            self._say(f"{value} is not downloaded yet: the first propagation with it asks before downloading it "
                      f"({size}, checksum verified)")
        else:
            later = "" if isinstance(value, Sam2) else " (loaded at the first propagation)"
            self._say(f"propagation with {tracker_name(value)}'s memory{later}")

    # -- propagations ---------------------------------------------------------------------
    def run_selected(self, label_id: int | None = None):
        """Propagate the labels layer's selected object (or ``label_id``) from the current
        slice in a worker, writing slice by slice; returns the worker (None if nothing started)."""
        session = self._session()
        if session is None:
            return None
        label_id = int(session.labels_layer.selected_label if label_id is None else label_id)
        if label_id < 1:
            self._say("select the label to propagate in the labels layer (0 is the background)")
            return None
        if not self._prepare(session):
            return None
        try:
            steps = session.propagation(label_id)  # the slice and the settings read here, on the GUI thread
        except ValueError as err:
            self._say(str(err))
            return None
        return self._run(session, steps, f"object {label_id}")

    def run_all(self):
        """Propagate every object of the labels in a worker (one undo step); returns the worker."""
        session = self._session()
        if session is None or not self._prepare(session):
            return None
        return self._run(session, session.propagation_all(), "all objects")

    def _prepare(self, session: ViewerSession) -> bool:
        """Hand the choice to the session; ask before a download. False: nothing to run."""
        if session.busy_writing():  # a commit or segment everything first
            return False
        try:
            spec = self.spec()
        except ValueError as err:
            self._say(str(err))
            return False
        session.tracker.choose(spec)
        size = _to_download(spec) if session.tracker.needs_loading else ""
        if size and not self.confirm(f"Download {spec} ({size}) from {REGISTRY[spec].url}?\n\nIt is stored in "
                                     f"{checkpoint_path(spec).parent} and verified against its checksum."):
            self._say(f"{spec} was not downloaded: choose another model to propagate with, or propagate again")
            return False
        return True

    def _run(self, session: ViewerSession, steps, what: str):
        name = session.tracker.name
        downloading = _to_download(session.tracker.choice)
        planes: set = set()

        def show(step):
            if isinstance(step, Loading):
                verb = f"downloading ({downloading}) and loading" if downloading else "loading"
                self._say(f"{verb} {step.name}...")
                return
            session.labels_layer.refresh()
            if getattr(step, "mask", None) is not None or getattr(step, "masks", None):
                planes.add(tuple(step.plane))
            self._say(f"propagating {what} with {name}: slice {_plane_text(step.plane)}"
                      + (f" ({step.stopped})" if step.stopped else ""))

        def done(_):
            self._say(f"propagated {what} with {name} to {len(planes)} slice(s), as one undo step")

        def ended():
            session.labels_layer.refresh()
            session.writing = ""
            self._busy(False)

        self._busy(True)
        session.writing = "a propagation"  # its steps join the undo history only when it ends
        worker = self.workers.steps(
            lambda: steps, desc=f"propagating ({name})", show=show, done=done,
            cancelled="propagation cancelled: the slices written so far stay, as one undo step", ended=ended,
        )
        return worker

    def _busy(self, running: bool) -> None:
        # one propagation at a time: they write the same labels and share one undo history
        self.tracker.enabled = self.checkpoint.enabled = not running
        self.selected.enabled = self.all.enabled = not running and self._stack
