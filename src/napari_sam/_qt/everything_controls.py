"""The "segment everything" controls of the annotation dock widget: the mode menu (the
modes the session's model offers, preselected as it recommends, and the refinement of a
rough Labels layer), "augment" for AIS, "whole volume" for a stack, and the button that
runs it in the widget's workers with progress and cancel. The session side is
:meth:`napari_sam.layers.ViewerSession.segment_everything`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, PushButton

from ..layers import ViewerSession
from ..layers.everything import EverythingProgress, mode_choices, rough_labels

__all__ = ["EverythingControls"]


class EverythingControls:
    """The widgets of "segment everything" and what they run.

    Parameters
    ----------
    viewer
        The napari viewer (its Labels layers are the rough labels offered).
    workers
        The widget's :class:`~napari_sam._qt.workers.Workers`.
    say
        Shows one line of status.
    session
        Returns the widget's current :class:`~napari_sam.layers.ViewerSession` (or None).

    Attributes
    ----------
    widgets : list
        The magicgui widgets, for the dock widget to lay out in its column.
    """

    def __init__(self, viewer, workers, say: Callable[[str], None], session: Callable[[], ViewerSession | None]):
        self.viewer, self.workers, self._say, self._session = viewer, workers, say, session
        self.mode = ComboBox(
            label="everything mode", value="auto",  # choices a callable: napari resets them per layer added
            choices=lambda *_: mode_choices(session() and session().annotator.model),
            tooltip="AIS, APG: from the model's instance decoder (models that have one, e.g. vit_b_lm); labels: "
            "refine a rough segmentation (a threshold, another tool's output) object by object",
        )
        self.whole_volume = CheckBox(text="whole volume", value=False, visible=False,
                                     tooltip="every slice of the stack, objects linked from slice to slice into 3D "
                                     "objects")
        self.augment = CheckBox(text="augment (slower, finer)", value=False, visible=False,
                                tooltip="AIS: average the instance decoder's maps of the slice seen enlarged and "
                                "mirrored (12 views, about 30 times the embedding work); splits more small touching "
                                "objects")
        self.rough = ComboBox(label="rough labels", choices=self._rough_choices, visible=False,
                              tooltip="Labels layer of the image's shape whose objects become box prompts")
        self.button = PushButton(text="Segment everything on this slice", enabled=False)
        self.widgets = [self.mode, self.rough, self.augment, self.whole_volume, self.button]
        self.button.clicked.connect(self.run)
        self.mode.changed.connect(self._mode_changed)
        self.whole_volume.changed.connect(self.show_scope)
        viewer.layers.events.inserted.connect(self.rough.reset_choices)
        viewer.layers.events.removed.connect(self.rough.reset_choices)

    def _rough_choices(self, *_):
        from napari.layers import Labels

        session = self._session()
        own = () if session is None else (session.labels_layer, session.preview_layer)
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Labels) and layer not in own]

    def _mode_changed(self, mode) -> None:
        self.rough.visible = mode == "labels"
        self.augment.visible = mode == "ais"

    def _volume(self) -> bool:
        session = self._session()
        return bool(self.whole_volume.value) and session is not None and bool(session.annotator.source.plane_axes)

    def show_scope(self, *_) -> None:
        """Name the button after what it segments: the slice, or the volume through it."""
        self.button.text = f"Segment everything {'in this volume' if self._volume() else 'on this slice'}"

    def attach(self, session: ViewerSession, recommended_mode: str) -> None:
        """A session started: its model's modes offered, the recommended one chosen."""
        self.button.enabled = True
        self.mode.choices = ()  # emptied first: new choices are appended, not put in order
        self.mode.reset_choices()
        self.mode.value = recommended_mode
        self._mode_changed(self.mode.value)
        self.whole_volume.visible = bool(session.annotator.source.plane_axes)
        self.rough.reset_choices()  # without the layers the session just added
        self.show_scope()

    def run(self):
        """Segment every object of the current slice, or of the whole volume (linked
        through it), in a worker (progress, cancel) and commit them; existing labels are
        kept unless overwriting is on. Returns the worker, or None when nothing runs."""
        session = self._session()
        if session is None or session.busy_writing():  # one run at a time, and no commit inside it
            return None
        mode = self.mode.value
        volume = self._volume()
        settings = {"augment": True} if mode == "ais" and self.augment.value else {}
        if mode == "labels":
            try:  # checked here, where the user can be told at once
                rough_labels(self.rough.value, session.annotator.labels_shape)
            except ValueError as err:
                self._say(str(err))
                return None

        def done(written):
            session.labels_layer.refresh()
            n = len(np.unique(written[written > 0]))
            where = f" on {int(written.any(axis=(-2, -1)).sum())} slice(s)" if volume else ""
            self._say(f"committed {n} object(s){where}")

        plane = session.current_plane()  # the slice shown now, read on the GUI thread
        rough = self.rough.value if mode == "labels" else None  # the user's other Labels layers are not a mode's input
        tracker = EverythingProgress(session.annotator.source.plane_grid[-1] if volume else 1)
        session.writing = "segment everything"
        return self.workers.steps(
            lambda: session.segment_everything(plane, mode, rough=rough, whole_volume=volume, **settings),
            desc="segmenting everything", show=lambda p: self._say(tracker.text(p)), progress_of=tracker.of,
            done=done, cancelled="segment everything cancelled: nothing was committed",
            ended=lambda: setattr(session, "writing", ""),
        )
