"""The dock widget: the one place where the session's slow steps become thread workers.

It holds no segmentation logic: every button calls :class:`~napari_sam.layers.ViewerSession`
(and through it :class:`~napari_sam.api.Annotator`), the same objects a script uses.
Loading a model, embedding, previews and commits run in napari thread workers with a
napari progress bar, so the viewer keeps drawing; a preview asked for while another is
being computed is computed once that one ends, with the prompts as they are then.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, PushButton
from napari.qt.threading import create_worker
from napari.utils import progress
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QSizePolicy

from ..api import MODEL_ENV_VAR, Annotator
from ..layers import KEYS, ViewerSession, source_from_layer

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["SamWidget"]

CHECKPOINT = "checkpoint file..."
# Layer data events sent before an edit takes effect (napari's ActionType values).
_BEFORE_EDIT = ("adding", "removing", "changing")


def _model_choices() -> list[str]:
    from ..core.models import DEFAULT_CHECKPOINT, DEFAULT_MODEL
    from ..weights import list_models

    names = ([DEFAULT_MODEL] if DEFAULT_CHECKPOINT.is_file() else []) + [e.name for e in list_models()]
    env = os.environ.get(MODEL_ENV_VAR)
    if env and env not in names and not os.path.isfile(env):
        env = None
    return ([env] if env and env not in names else []) + names + [CHECKPOINT]


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
        self._workers: set = set()
        self._preview_running = False
        self._preview_again = False
        self._closed = False
        self._embed_worker = None

        self.image = ComboBox(label="image", choices=self._image_choices, tooltip="image layer to segment (2D to 4D, RGB)")
        choices = _model_choices()
        default = os.environ.get(MODEL_ENV_VAR) or choices[0]
        self.model = ComboBox(label="model", choices=choices, value=default if default in choices else choices[0],
                              tooltip="default: the small model shipped with the plugin (offline); registry models are "
                              "downloaded once, checksum verified; or a checkpoint file")
        self.checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.pth *.pt", visible=self.model.value == CHECKPOINT)
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.dtype = ComboBox(label="precision", choices=["auto", "float32", "bfloat16", "float16"], value="auto",
                              tooltip="auto: bfloat16 where the hardware computes it natively, else float32")
        self.cache = FileEdit(label="embedding cache", mode="d", value="",
                              tooltip="folder for the Zarr embedding cache; empty: beside a Zarr image, else the user cache")
        self.labels_path = FileEdit(label="labels on disk", mode="w", value="", filter="*.zarr",
                                    tooltip="Zarr array for the labels (needed for images larger than memory); empty: in memory")
        self.start = PushButton(text="Start")
        self.embed_slice = PushButton(text="Embed slice", enabled=False)
        self.embed_all = PushButton(text="Embed all slices", enabled=False)
        self.cancel = PushButton(text="Cancel", enabled=False)
        self.overwrite = CheckBox(text="overwrite existing labels", value=False)
        self.commit = PushButton(text=f"Commit ({KEYS['commit']})", enabled=False)
        self.propagate = PushButton(text="Propagate selected label through slices", enabled=False,
                                    tooltip="follow the labels layer's selected object from this slice up and down the stack")
        self.everything_mode = ComboBox(
            label="segment everything",
            choices=[("point grid (SAM)", "auto"), ("detector boxes", "boxes"), ("objects of a Labels layer", "labels")],
            value="auto",
            tooltip="labels: refine a rough segmentation (a threshold, another tool's output) object by object",
        )
        self.rough = ComboBox(label="rough labels", choices=self._rough_choices, visible=False,
                              tooltip="Labels layer of the image's shape whose objects become box prompts")
        self.everything = PushButton(text="Segment everything on this slice", enabled=False)
        self.undo = PushButton(text=f"Undo ({KEYS['undo']})", enabled=False)
        self.clear = PushButton(text=f"Clear prompts ({KEYS['clear']})", enabled=False)
        self.status = Label(value="choose an image and a model, then Start")
        self.status.native.setWordWrap(True)
        # A wrapping QLabel asks for the width of its longest word: left alone it sat as a
        # narrow centred column under the buttons.
        self.status.native.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        self.status.native.setAlignment(Qt.AlignLeft | Qt.AlignVCenter)
        self.extend([
            self.image, self.model, self.checkpoint, self.device, self.dtype, self.cache, self.labels_path, self.start,
            self.embed_slice, self.embed_all, self.cancel, self.overwrite, self.commit, self.propagate, self.everything_mode,
            self.rough, self.everything, self.undo, self.clear,
            self.status,
        ])

        self.model.changed.connect(lambda v: setattr(self.checkpoint, "visible", v == CHECKPOINT))
        self.start.clicked.connect(self.start_session)
        self.embed_slice.clicked.connect(lambda: self.run_embedding(current=True))
        self.embed_all.clicked.connect(lambda: self.run_embedding(current=False))
        self.cancel.clicked.connect(self.cancel_embedding)
        self.commit.clicked.connect(lambda: self.session and self.session.commit())
        self.undo.clicked.connect(self.undo_commit)
        self.propagate.clicked.connect(self.run_propagation)
        self.everything.clicked.connect(self.run_everything)
        self.clear.clicked.connect(lambda: self.session and self.session.clear_prompts())
        self.overwrite.changed.connect(lambda v: self.session and setattr(self.session, "overwrite", bool(v)))
        self.everything_mode.changed.connect(lambda v: setattr(self.rough, "visible", v == "labels"))
        for choice in (self.image, self.rough):
            viewer.layers.events.inserted.connect(choice.reset_choices)
            viewer.layers.events.removed.connect(choice.reset_choices)
        self.native.destroyed.connect(self._on_close)

    # -- helpers -------------------------------------------------------------------------
    def _image_choices(self, *_):
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _rough_choices(self, *_):
        from napari.layers import Labels

        own = () if self.session is None else (self.session.labels_layer, self.session.preview_layer)
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Labels) and layer not in own]

    def _gui(self, fn):
        """Wrap a callback that touches widgets: workers report after the viewer may have
        closed, when Qt has already deleted the widgets (PyQt then raises RuntimeError)."""

        def call(*args):
            if self._closed:
                return None
            try:
                return fn(*args)
            except RuntimeError as err:
                if "deleted" not in str(err):
                    raise
                self._on_close()
                return None

        return call

    def _say(self, text: str) -> None:
        self._gui(lambda: setattr(self.status, "value", text))()

    def _on_close(self, *_):
        self._closed = True
        for worker in list(self._workers):
            worker.quit()

    def _start(self, worker, done=None):
        """Start a worker; ``done`` gets its result on the GUI thread unless the widget is gone."""
        self._workers.add(worker)
        worker.finished.connect(lambda: self._workers.discard(worker))
        if done is not None:
            worker.returned.connect(self._gui(done))
        worker.errored.connect(lambda err: self._say(f"error: {err}"))
        worker.start()
        return worker

    def _run(self, fn, done=None, label: str = ""):
        """ViewerSession.run: ``fn`` in a thread worker."""
        if label:
            self._say(label + "...")
        return self._start(create_worker(fn, _start_thread=False), done)

    # -- steps ---------------------------------------------------------------------------
    def model_spec(self) -> str:
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
            self._say("no image layer: open an image first")
            return
        try:
            spec = self.model_spec()
        except ValueError as err:
            self._say(str(err))
            return
        cache = str(self.cache.value) if str(self.cache.value) not in ("", ".") else None
        labels = str(self.labels_path.value) if str(self.labels_path.value) not in ("", ".") else None
        source = source_from_layer(layer)
        device, dtype = self.device.value, self.dtype.value
        self.start.enabled = False

        def build():
            annotator = Annotator(source, spec, labels, cache=cache, device=device, dtype=dtype)
            annotator.warm_up()
            return annotator

        def ready(annotator):
            self.session = ViewerSession.attach(self.viewer, layer, annotator=annotator)
            self.session.run = self._run
            self.session.overwrite = bool(self.overwrite.value)
            self.session.points_layer.events.data.connect(self._on_prompts_changed)
            self.session.boxes_layer.events.data.connect(self._on_prompts_changed)
            self.viewer.dims.events.current_step.connect(self.request_preview)
            for button in (self.embed_slice, self.embed_all, self.commit, self.undo, self.clear, self.everything):
                button.enabled = True
            self.propagate.enabled = bool(annotator.source.plane_axes)
            from ..core.automatic import recommended

            self.everything_mode.value = recommended(annotator.model).mode
            self.rough.reset_choices()  # without the layers the session just added
            self.start.enabled = True
            self._say(f"{annotator.model.source.name}: click to add points ({KEYS['toggle']}: foreground/background)")

        worker = create_worker(build, _start_thread=False)
        worker.errored.connect(self._gui(lambda err: (setattr(self.start, "enabled", True), self._say(f"error: {err}"))))
        self._say(f"loading {spec}...")
        self._start(worker, ready)

    def run_embedding(self, current: bool = True):
        """Embed the current slice or all slices in a worker, with progress and cancel."""
        if self.session is None:
            return None
        plane = self.session.current_plane() if current else None
        steps = self.session.annotator.embed_steps(plane)
        bar = progress(total=0, desc="embedding")

        def work():
            for p in steps:
                yield p

        def show(p):
            bar.total = p.total
            bar.n = p.done
            bar.refresh()
            self._say(f"embedding: {p.done}/{p.total} tiles")

        worker = create_worker(work, _start_thread=False)
        worker.yielded.connect(self._gui(show))
        worker.finished.connect(bar.close)
        worker.finished.connect(self._gui(lambda: setattr(self.cancel, "enabled", False)))
        worker.aborted.connect(lambda: self._say("embedding cancelled: finished tiles stay cached"))
        worker.returned.connect(lambda _: self._say("embedding done"))
        self.cancel.enabled = True
        self._embed_worker = worker
        return self._start(worker)

    def cancel_embedding(self) -> None:
        """Stop the running embedding or propagation (what is done stays)."""
        if self._embed_worker is not None:
            self._embed_worker.quit()

    def run_everything(self):
        """Segment every object of the current slice in a worker (progress, cancel) and
        commit them; existing labels are kept."""
        if self.session is None:
            return None
        session = self.session
        bar = progress(total=0, desc="segmenting everything")

        def show(p):
            bar.total = p.total
            bar.n = p.done
            bar.refresh()
            self._say(f"segmenting everything: {p.done}/{p.total} {p.stage}")

        def done(commit):
            session.after_commit(commit)
            n = 0 if commit is None else sum(1 for i in commit.ids if i)
            self._say(f"committed {n} object(s)")

        mode = self.everything_mode.value
        if mode == "labels":
            try:  # checked here, where the user can be told at once
                session.check_rough(self.rough.value)
            except ValueError as err:
                self._say(str(err))
                bar.close()
                return None
        plane = session.current_plane()  # the slice shown now, read on the GUI thread
        worker = create_worker(session.segment_everything, plane, mode, rough=self.rough.value, _start_thread=False)
        worker.yielded.connect(self._gui(show))
        worker.finished.connect(bar.close)
        worker.finished.connect(self._gui(lambda: setattr(self.cancel, "enabled", False)))
        worker.aborted.connect(lambda: self._say("segment everything cancelled: nothing was committed"))
        self.cancel.enabled = True
        self._embed_worker = worker
        return self._start(worker, done)

    def run_propagation(self, label_id: int | None = None):
        """Propagate an object through the stack in a worker, writing slice by slice."""
        if self.session is None:
            return None
        session = self.session
        try:
            steps = session.propagation(label_id)
        except ValueError as err:
            self._say(str(err))
            return None
        bar = progress(total=0, desc="propagating")

        def work():
            yield from steps

        def show(step):
            bar.total = step.total
            bar.n = step.done
            bar.refresh()
            session.labels_layer.refresh()
            self._say(f"propagating: plane {step.plane}" + (f" ({step.stopped})" if step.stopped else ""))

        worker = create_worker(work, _start_thread=False)
        worker.yielded.connect(self._gui(show))
        worker.finished.connect(bar.close)
        worker.finished.connect(self._gui(lambda: setattr(self.cancel, "enabled", False)))
        worker.finished.connect(self._gui(session.labels_layer.refresh))
        worker.aborted.connect(lambda: self._say("propagation cancelled: the slices written so far stay"))
        self.cancel.enabled = True
        self._embed_worker = worker
        return self._start(worker)

    def _on_prompts_changed(self, event=None) -> None:
        # napari announces each edit twice, before ("adding") and after ("added"); only
        # the second one holds the new prompts, and answering both doubled every preview.
        if str(getattr(event, "action", "")) in _BEFORE_EDIT:
            return
        self.request_preview()

    def request_preview(self, *_):
        """Recompute the preview for the prompts as they are now (at most one at a time)."""
        if self.session is None or self._closed:
            return
        if self._preview_running:
            self._preview_again = True
            return
        self._preview_running = True
        self._preview_again = False
        session = self.session
        plane = session.current_plane()

        def done(result):
            session.show_preview(result)
            n = sum(1 for m in result[2] if m.area)
            self._say(f"preview: {n} object(s); {KEYS['commit']} commits" if n else "add points or boxes")

        worker = create_worker(session.compute_preview, plane, session.prompts(plane), _start_thread=False)
        worker.finished.connect(self._preview_finished)
        if not session.annotator.is_embedded(plane):
            self._say("embedding this slice first...")
        self._start(worker, done)

    def _preview_finished(self):
        self._preview_running = False
        if self._preview_again and not self._closed:
            self.request_preview()

    def undo_commit(self) -> None:
        if self.session is not None:
            undone = self.session.undo()
            ids = sorted({i for c in undone for i in c.ids if i})
            self._say(f"undid object(s) {ids} on {len(undone)} plane(s)" if undone else "nothing to undo")
