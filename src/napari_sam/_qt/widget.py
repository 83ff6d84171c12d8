"""The annotation dock widget: buttons and a status line over a
:class:`~napari_sam.layers.ViewerSession`.

It holds no segmentation logic: every button calls the session (and through it
:class:`~napari_sam.api.Annotator`), the same objects a script uses. Loading a model,
embedding, previews and commits run through :class:`~napari_sam._qt.workers.Workers` in
napari thread workers with a progress bar, so the viewer keeps drawing; a preview asked
for while another is being computed is computed once that one ends, with the prompts as
they are then.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, LineEdit, PushButton
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QSizePolicy

from ..api import Annotator
from ..core.models import default_model_spec, model_choices
from ..layers import KEYS, ViewerSession, attach, source_from_layer
from ..layers.keys import unbind_keys
from .everything_controls import EverythingControls
from .tracking import TrackingControls
from .workers import Workers, error_text

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["CHECKPOINT", "SamWidget", "model_picker_choices", "ome_zarr_of"]

CHECKPOINT = "checkpoint file..."
RGB_READINGS = {"model's advice": None, "colours": "rgb", "haematoxylin stain": "haematoxylin"}
"""The widget's choices for an RGB image, and the channel each one asks the image for."""
# Layer data events sent before an edit takes effect (napari's ActionType values).
_BEFORE_EDIT = ("adding", "removing", "changing")


def ome_zarr_of(layer) -> str | None:
    """The OME-Zarr container an image layer was read from, or None."""
    from ..core.ngff import is_ome_zarr

    path = getattr(getattr(layer, "source", None), "path", None)
    return str(path) if path and is_ome_zarr(path) else None


def model_picker_choices() -> list[str]:
    """The model pickers' entries: :func:`~napari_sam.core.models.model_choices`, then
    "checkpoint file..."."""
    return model_choices() + [CHECKPOINT]


class SamWidget(Container):
    """Segment Anything: pick an image and a model, click, commit.

    Parameters
    ----------
    viewer
        The napari viewer (npe2 passes it).
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.session: ViewerSession | None = None
        self.workers = Workers(self._say)
        self._preview_running = False
        self._preview_again = False

        self.image = ComboBox(label="image", choices=self._image_choices,
                              tooltip="image layer to segment (2D to 4D, RGB)")
        choices = model_picker_choices()
        default = default_model_spec() or choices[0]
        self.model = ComboBox(label="model", choices=choices, value=default if default in choices else choices[0],
                              tooltip="default: the small model shipped with the plugin (offline); registry models are "
                              "downloaded once, checksum verified; or a checkpoint file")
        self.checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.pth *.pt",
                                   visible=self.model.value == CHECKPOINT)
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.dtype = ComboBox(label="precision", choices=["auto", "float32", "bfloat16", "float16"], value="auto",
                              tooltip="auto: bfloat16 where the hardware computes it natively, else float32")
        self.magnification = ComboBox(
            label="magnification", choices=["auto", "1", "1.5", "2", "3"], value="auto",
            tooltip="how many times the model sees the image enlarged; auto: the model's advice (the default model "
            "enlarges images of small nuclei up to 3x, from their estimated size; SAM's weights: 1)")
        self.rgb_reading = ComboBox(
            label="RGB read as", choices=list(RGB_READINGS), value="model's advice", visible=False,
            tooltip="model's advice: the default model reads stained brightfield (H&E) as its haematoxylin stain, "
            "other images and models the colours")
        self.cache = FileEdit(label="embedding cache", mode="d", value="",
                              tooltip="folder for the Zarr embedding cache; empty: beside a Zarr image, "
                              "else the user cache")
        self.labels_path = FileEdit(label="labels on disk", mode="w", value="", filter="*.zarr",
                                    tooltip="Zarr array for the labels (needed for images larger than memory); "
                                    "empty: in memory")
        self.ngff_labels = CheckBox(text="labels into the image's OME-Zarr", value=False, visible=False,
                                    tooltip="write objects as an NGFF label image labels/<name> inside the OME-Zarr "
                                    "the image was opened from, its pyramid kept current (the image arrays are never "
                                    "touched; an existing label image of that name is continued)")
        self.ngff_name = LineEdit(label="label image", value="napari-sam", visible=False,
                                  tooltip="name of the label image under labels/ in the OME-Zarr")
        self.start = PushButton(text="Start")
        self.embed_slice = PushButton(text="Embed slice", enabled=False)
        self.embed_all = PushButton(text="Embed all slices", enabled=False)
        self.cancel = PushButton(text="Cancel", enabled=False)
        self.overwrite = CheckBox(text="overwrite existing labels", value=False)
        self.commit = PushButton(text=f"Commit ({KEYS['commit']})", enabled=False)
        self.tracking = TrackingControls(self.workers, self._say, lambda: self.session, parent=self.native)
        self.propagate = self.tracking.selected  # "Propagate selected label through slices"
        self.everything_controls = EverythingControls(viewer, self.workers, self._say, lambda: self.session)
        ec = self.everything_controls  # its widgets under the names the widget has always had
        self.everything_mode, self.whole_volume, self.augment = ec.mode, ec.whole_volume, ec.augment
        self.rough, self.everything = ec.rough, ec.button
        self.undo = PushButton(text=f"Undo ({KEYS['undo']})", enabled=False)
        self.clear = PushButton(text=f"Clear prompts ({KEYS['clear']})", enabled=False)
        self.status = Label(value="choose an image and a model, then Start")
        self.status.native.setWordWrap(True)
        # A wrapping QLabel asks for the width of its longest word: left alone it sat as a
        # narrow centred column under the buttons.
        self.status.native.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        self.status.native.setAlignment(Qt.AlignLeft | Qt.AlignVCenter)
        self.extend([
            self.image, self.model, self.checkpoint, self.device, self.dtype, self.magnification, self.rgb_reading,
            self.cache,
            self.labels_path,
            self.ngff_labels, self.ngff_name, self.start,
            self.embed_slice, self.embed_all, self.cancel, self.overwrite, self.commit, *self.tracking.widgets,
            *ec.widgets, self.undo, self.clear,
        ])
        self.native.layout().addWidget(self.status.native)  # the whole width, not the value column: it wraps less

        self.model.changed.connect(lambda v: setattr(self.checkpoint, "visible", v == CHECKPOINT))
        self.image.changed.connect(self._image_changed)
        self.ngff_labels.changed.connect(lambda v: setattr(self.ngff_name, "visible", bool(v)))
        self._image_changed(self.image.value)
        self.start.clicked.connect(self.start_session)
        self.embed_slice.clicked.connect(lambda: self.run_embedding(current=True))
        self.embed_all.clicked.connect(lambda: self.run_embedding(current=False))
        self.cancel.clicked.connect(self.workers.cancel)
        self.workers.cancel_changed = self.workers.gui(lambda running: setattr(self.cancel, "enabled", running))
        self.commit.clicked.connect(lambda: self.session and self.session.commit())
        self.undo.clicked.connect(self.undo_commit)
        self.clear.clicked.connect(lambda: self.session and self.session.clear_prompts())
        self.overwrite.changed.connect(lambda v: self.session and self.session.set_overwrite(v))
        viewer.layers.events.inserted.connect(self.image.reset_choices)
        viewer.layers.events.removed.connect(self.image.reset_choices)
        # the workers are captured, not the widget: its attributes may be gone when Qt reports the destruction
        self.native.destroyed.connect(lambda *_, workers=self.workers: workers.close())
        # napari's close button takes the widget out of its dock without destroying it
        self.native_parent_changed.connect(lambda parent: parent is None and self._closed())

    # -- helpers -------------------------------------------------------------------------
    def _image_choices(self, *_):
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _image_changed(self, layer) -> None:
        # the choice exists only for an image read from an OME-Zarr container
        offered = ome_zarr_of(layer) is not None
        self.ngff_labels.visible = offered
        self.rgb_reading.visible = bool(getattr(layer, "rgb", False))
        self.ngff_name.visible = offered and bool(self.ngff_labels.value)
        if self.session is not None and layer is not None and layer is not self.session.image_layer:
            self._say(f"press Start to segment {layer.name}: clicks still go to {self.session.image_layer.name}")

    def _closed(self) -> None:
        """Closed by the user: its work stops (what was finished stays) and its keys are freed."""
        self.workers.close()
        if self.session is not None:
            unbind_keys(self.viewer)

    def _say(self, text: str) -> None:
        self.status.value = text

    # -- steps ---------------------------------------------------------------------------
    def choose_model(self, spec: str) -> None:
        """Preselect a model: a name the picker lists, else a checkpoint file."""
        if spec in self.model.choices:
            self.model.value = spec
        else:
            self.model.value = CHECKPOINT
            self.checkpoint.value = spec

    def model_spec(self) -> str:
        """The chosen model: a name, or the checkpoint file's path."""
        if self.model.value == CHECKPOINT:
            path = str(self.checkpoint.value)
            if not path or not os.path.isfile(path):
                raise ValueError("choose a checkpoint file")
            return path
        return self.model.value

    def start_session(self) -> None:
        """Load the model and prepare the image (in a worker), then create the layers."""
        layer = self.image.value
        if layer is None:
            return self._say("no image layer: open an image first")
        if self.session is not None and self.session.busy_writing():  # a new session would be a second writer
            return
        try:
            spec = self.model_spec()
        except ValueError as err:
            self._say(str(err))
            return
        cache = str(self.cache.value) if str(self.cache.value) not in ("", ".") else None
        labels = str(self.labels_path.value) if str(self.labels_path.value) not in ("", ".") else None
        container = ome_zarr_of(layer) if self.ngff_labels.value else None
        name = str(self.ngff_name.value).strip()
        if container is not None and labels is not None:
            self._say("choose one place for the labels: a Zarr array on disk or the image's OME-Zarr")
            return
        source = source_from_layer(layer)
        if source.rgb:  # "model's advice" leaves the channel unset (core.stain.channel_for)
            source = source.with_channel(RGB_READINGS[self.rgb_reading.value])
        device, dtype = self.device.value, self.dtype.value
        magnification = None if self.magnification.value == "auto" else float(self.magnification.value)
        self.start.enabled = False
        # Started again on the same image (another model, say): the objects go on in its labels layer.
        old = self.session
        carried = old.labels_layer if (old is not None and old.image_layer is layer and labels is None
                                       and container is None and old.labels_layer in self.viewer.layers
                                       and not old.labels_layer.multiscale) else None

        def build():
            if container is not None:
                from ..core.ngff import open_label_image

                target = open_label_image(container, name)
            else:
                target = carried.data if carried is not None else labels
            annotator = Annotator(source, spec, target, cache=cache, device=device, dtype=dtype,
                                  magnification=magnification)
            annotator.warm_up()
            return annotator

        def ready(annotator):
            from ..auto import recommended

            self.session = attach(self.viewer, layer, annotator=annotator, run=self.workers.call,
                                  overwrite=bool(self.overwrite.value), say=self.workers.say, labels=carried)
            self.session.points_layer.events.data.connect(self._on_prompts_changed)
            self.session.boxes_layer.events.data.connect(self._on_prompts_changed)
            self.viewer.dims.events.current_step.connect(self.request_preview)
            for button in (self.embed_slice, self.embed_all, self.commit, self.undo, self.clear):
                button.enabled = True
            self.tracking.attach(self.session)
            self.everything_controls.attach(self.session, recommended(annotator.model).mode)
            self.start.enabled = True
            stain = ", H&E read as its haematoxylin stain" if annotator.embeddings.source.stain else ""
            self._say(f"{annotator.model.source.name} at {annotator.embeddings.magnification:g}x{stain}: click to add "
                      f"points ({KEYS['toggle']}: foreground/background)")

        def failed(err):
            self.start.enabled = True
            self._say(error_text(err))

        self._say(f"loading {spec}...")
        self.workers.start(self.workers.make(build), ready, failed)

    def run_embedding(self, current: bool = True):
        """Embed the current slice or all slices in a worker, with progress and cancel."""
        if self.session is None:
            return None
        plane = self.session.current_plane() if current else None
        return self.workers.steps(
            self.session.annotator.embed_steps, plane, desc="embedding",
            show=lambda p: self._say(f"embedding: {p.done}/{p.total} tiles"),
            done=lambda _: self._say("embedding done"),
            cancelled="embedding cancelled: finished tiles stay cached",
        )

    def run_everything(self):
        """Segment everything in a worker (:meth:`EverythingControls.run
        <napari_sam._qt.everything_controls.EverythingControls.run>`)."""
        return self.everything_controls.run()

    def run_propagation(self, label_id: int | None = None):
        """Propagate an object through the stack in a worker, writing slice by slice, with
        the model "propagate with" names (:meth:`TrackingControls.run_selected`)."""
        return self.tracking.run_selected(label_id)

    def _on_prompts_changed(self, event=None) -> None:
        # napari announces each edit twice, before ("adding") and after ("added"); only
        # the second one holds the new prompts, and answering both doubled every preview.
        if str(getattr(event, "action", "")) in _BEFORE_EDIT:
            return
        self.request_preview()

    def request_preview(self, *_):
        """Recompute the preview for the prompts as they are now (at most one at a time)."""
        if self.session is None or self.workers.closed:
            return
        if self._preview_running:
            self._preview_again = True
            return
        session = self.session
        plane = session.current_plane()
        try:
            prompts = session.prompts(plane)  # read here, on the GUI thread
        except ValueError as err:
            self._say(str(err))
            return
        self._preview_running = True
        self._preview_again = False

        def done(result):
            session.show_preview(result)
            n = sum(1 for m in result[2] if m.area)
            if n or prompts:  # a slice without prompts (scrolling) keeps the last message, e.g. a propagation's
                self._say(f"preview: {n} object(s); {KEYS['commit']} commits" if n else "add points or boxes")

        worker = self.workers.make(session.compute_preview, plane, prompts)
        worker.finished.connect(self._preview_finished)
        if prompts and not session.annotator.is_embedded(plane):
            self._say("embedding this slice first...")
        self.workers.start(worker, done)

    def _preview_finished(self):
        self._preview_running = False
        if self._preview_again and not self.workers.closed:
            self.request_preview()

    def undo_commit(self) -> None:
        if self.session is not None and not self.session.busy_writing():
            undone = self.session.undo()
            ids = sorted({i for c in undone for i in c.ids if i})
            self._say(f"undid object(s) {ids} on {len(undone)} plane(s)" if undone else "nothing to undo")
