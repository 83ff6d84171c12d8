"""The training dock widget: fine-tune a model on finished annotations, then use it.

Like the annotation widget it holds no logic of its own: the data come from
:class:`~napari_sam.train.SegmentationDataset`, the steps from
:class:`~napari_sam.train.Trainer`, run in a napari thread worker with a progress
bar and a live curve of the loss and the validation IoU.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton, SpinBox

from ..layers.training_data import annotated_planes
from .curve import CurveWidget
from .widget import CHECKPOINT, RGB_READINGS, model_picker_choices
from .workers import Workers

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["INSTANCE_DECODER", "TrainingWidget", "check_checkpoint_out", "free_name"]

INSTANCE_DECODER = "instance-decoder"
"""The mode that trains an instance decoder (as ``napari-sam train --mode instance-decoder``)."""


def check_checkpoint_out(path) -> Path:
    """Where a trained model may be saved, checked before the training: a new ``.pth`` (or
    ``.pt``) file in a folder that accepts files; an existing file (the base checkpoint,
    an earlier model, an image) is never replaced."""
    from ..core.outputs import check_file_output

    path = check_file_output(Path(str(path)), (".pth", ".pt"), "a model", "save as", overwrite=None)
    if path.exists():  # the widget has no "overwrite": said as what to do there
        raise ValueError(f"{path} exists and is kept: choose another name to save the model as")
    return path


def free_name(path) -> str:
    """``path``, or with ``_2``, ``_3``, ... before its suffix: the first that does not exist."""
    path, k = Path(path), 2
    candidate = path
    while candidate.exists():
        candidate, k = path.with_name(f"{path.stem}_{k}{path.suffix}"), k + 1
    return str(candidate)


class TrainingWidget(Container):
    """Fine-tune SAM on an image and its finished labels.

    Parameters
    ----------
    viewer
        The napari viewer (npe2 passes it).
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.trainer = None
        self.worker = None
        self.model = None
        self.reading = None  # the "RGB read as" choice the trained model learned with (RGB images only)
        self.workers = Workers(lambda text: setattr(self.status, "value", text))
        self.image = ComboBox(label="image", choices=lambda *_: self._layers("Image"))
        self.labels = ComboBox(label="labels", choices=lambda *_: self._layers("Labels"),
                               tooltip="finished annotations: every object on an annotated plane is used")
        # as in the annotation widget: how an RGB image is read is what the model learns to
        # read, and the saved model advises that reading (train.checkpoints.learned_stain)
        self.rgb_reading = ComboBox(label="RGB read as", choices=list(RGB_READINGS), value="model's advice",
                                    visible=False, tooltip="read stained brightfield (H&E) as its colours or as "
                                    "its haematoxylin stain; the trained model will advise the same reading")
        choices = model_picker_choices()
        self.base = ComboBox(label="start from", choices=choices, value=choices[0])
        self.checkpoint = FileEdit(label="checkpoint", mode="r", visible=False)
        # the third gives the model (SAM's weights, a whole-model fine-tune) an instance decoder
        # for "Segment everything" (AIS, APG), its SAM left as it is
        self.mode = ComboBox(label="train", choices=[("mask decoder (fast)", "decoder"), ("whole model", "full"),
                                                     ("instance decoder (segment everything)", INSTANCE_DECODER)],
                             value="decoder", tooltip="what learns: the prompted masks' decoder, the whole model, or "
                             "a new instance decoder for automatic segmentation")
        self.minutes = FloatSpinBox(label="minutes", value=10.0, min=0.5, max=24 * 60, step=0.5)
        self.steps = SpinBox(label="steps at most", value=1000, min=1, max=1_000_000)
        self.out = FileEdit(label="save as", mode="w", filter="*.pth",
                            value=free_name(os.path.abspath("finetuned_sam.pth")))
        self.more = CheckBox(text="more settings", value=False)
        self.settings = self._settings_widgets()
        self.train = PushButton(text="Train")
        self.stop = PushButton(text="Stop", enabled=False)
        self.use = PushButton(text="Use the trained model for annotation", enabled=False)
        self.status = Label(value="pick an image and its labels")
        self.status.native.setWordWrap(True)
        self.curve = CurveWidget()
        self.extend([self.image, self.labels, self.rgb_reading, self.base, self.checkpoint, self.mode, self.minutes,
                     self.steps, self.out, self.more, *self.settings.values(), self.train, self.stop, self.use])
        # the status and the curve take the whole width, not the value column of a labelled row
        self.native.layout().addWidget(self.status.native)
        self.native.layout().addWidget(self.curve)
        self.base.changed.connect(lambda v: setattr(self.checkpoint, "visible", v == CHECKPOINT))
        self.image.changed.connect(self._image_changed)
        self._image_changed(self.image.value)
        self.more.changed.connect(self._show_settings)
        self.mode.changed.connect(self._show_settings)
        self.train.clicked.connect(self.start)
        self.stop.clicked.connect(self.workers.cancel)
        self.use.clicked.connect(self.use_model)
        viewer.layers.events.inserted.connect(self.reset_choices)
        viewer.layers.events.removed.connect(self.reset_choices)
        # The workers, not the widget, are captured: by the time Qt reports the destruction the
        # widget's Python attributes may be gone.
        self.native.destroyed.connect(lambda *_, workers=self.workers: workers.close())

    @staticmethod
    def _settings_widgets() -> dict:
        """The settings a user may want to change after a first run, hidden until asked
        for; they start at :class:`~napari_sam.train.TrainingConfig`'s defaults, which stay
        the one place those live."""
        from ..train import TrainingConfig

        defaults = TrainingConfig()
        return {
            "learning_rate": FloatSpinBox(label="learning rate", value=defaults.peak_learning_rate, min=1e-6,
                                          max=1e-2, step=1e-5, visible=False,
                                          tooltip="the peak of the warm-up and cosine schedule"),
            "box_noise": FloatSpinBox(label="box jitter", value=defaults.box_noise, min=0.0, max=0.5, step=0.01,
                                      visible=False, tooltip="how far training boxes stray from the labels' boxes, "
                                      "as a share of the box's size (0: exact boxes)"),
            "central_click_probability": FloatSpinBox(
                label="central clicks", value=defaults.central_click_probability, min=0.0, max=1.0, step=0.05,
                visible=False, tooltip="share of an object's first clicks drawn near its middle, where people click; "
                "the rest land anywhere on it"),
            "seed": SpinBox(label="seed", value=defaults.seed, min=0, max=2**31 - 1, visible=False,
                            tooltip="the validation split and every random draw of the run"),
        }

    def _image_changed(self, layer) -> None:
        self.rgb_reading.visible = bool(getattr(layer, "rgb", False))

    def channel(self) -> str | None:
        """How the chosen image's planes are read: None (the model's advice, and every
        image that is not RGB), ``"rgb"`` or ``"haematoxylin"``."""
        if not getattr(self.image.value, "rgb", False):
            return None
        return RGB_READINGS[self.rgb_reading.value]

    def _show_settings(self, *_):
        # an instance decoder's run takes the seed only: the rest are the prompted training's
        decoder = self.mode.value == INSTANCE_DECODER
        for name, widget in self.settings.items():
            widget.visible = bool(self.more.value) and (name == "seed" or not decoder)

    def show_step(self, step: int, loss: float, validation: str, value: float | None) -> None:
        """A training step on the curve and the status line, with its validation figure when it validated."""
        self.curve.add("loss", step, loss)
        text = f"step {step}: loss {loss:.3f}"
        if value is not None:
            self.curve.add(validation, step, value)
            text += f", {validation} {value:.3f}"
        self.status.value = text

    def _layers(self, kind: str):
        return [(layer.name, layer) for layer in self.viewer.layers if type(layer).__name__ == kind]

    def start(self):
        """Build the data and the trainer, then train in a worker for the minutes given (the
        run sized to them, as ``napari-sam train --minutes`` is, never past the steps at
        most) or until Stop, and save the model: also when stopped or when the widget
        closes mid-run, and every ``SAVE_EVERY`` steps on the way (the current weights, the
        best so far beside them for ``napari-sam train --resume``), so that napari killed
        outright keeps the run up to there."""
        from ..core.models import resolve_model
        from ..train import SegmentationDataset, Trainer, TrainingConfig
        from ..train import run as training_run

        if self.workers.busy:
            return None
        try:
            if self.image.value is None or self.labels.value is None:
                raise ValueError("pick an image layer and a Labels layer of its annotations")
            out = check_checkpoint_out(self.out.value)
            data = SegmentationDataset.from_arrays(*annotated_planes(self.image.value, self.labels.value),
                                                   channel=self.channel())
        except (ValueError, OSError) as err:
            self.status.value = f"cannot train: {err}"
            return None
        base = str(self.checkpoint.value) if self.base.value == CHECKPOINT else self.base.value
        reading = self.rgb_reading.value if getattr(self.image.value, "rgb", False) else None
        steps, minutes = int(self.steps.value), float(self.minutes.value)
        chosen = {name: widget.value for name, widget in self.settings.items()}
        if self.mode.value == INSTANCE_DECODER:
            from .instance_decoder_training import start_instance_decoder

            return start_instance_decoder(self, data, base, out, reading, steps, minutes, int(chosen["seed"]))
        train, val = data.split(0.2, seed=int(chosen["seed"])) if len(data) > 1 else (data, data)
        try:
            config = TrainingConfig(mode=self.mode.value, steps=steps, validate_every=max(1, min(50, steps // 10)),
                                    **chosen)
        except ValueError as err:
            self.status.value = f"cannot train: {err}"
            return None
        self.curve.clear()
        self.trainer = None  # a Stop before this run's first step must not save the last run's model
        run: dict = {}  # this run's trainer, for a save that needs no widget (it may close mid-run)

        def work():
            model = resolve_model(base, device="auto", dtype="float32")
            self.trainer = run["trainer"] = Trainer(model, train, config, validation_data=val)
            try:
                for record in training_run.run_steps(run["trainer"], minutes, max_steps=steps):
                    yield record
                    if record.step % training_run.SAVE_EVERY == 0:
                        run["trainer"].save(out)  # napari killed outright (out of memory) keeps the run to here
            except Exception:
                with contextlib.suppress(Exception):  # the error is said as it is; what was learned is kept
                    save_stopped()
                raise
            training_run.finish(run["trainer"])
            run["trainer"].save(out)
            return out

        def save_stopped():
            if "trainer" in run and not run.get("saved"):
                training_run.finish(run["trainer"])
                run["trainer"].save(out)
                run["saved"] = True

        def show(record):
            self.show_step(record.step, record.loss, "validation IoU", record.validation_iou)

        def done(path):
            run["said"] = True
            kept = run["trainer"].weights_step
            self.status.value = f"saved {path}" + ("" if kept is None else f" (the weights of step {kept}, "
                                                   "best on validation)")
            self.offer_trained(path, reading)

        def stopped():
            run["said"] = True
            if "trainer" not in run:
                self.status.value = "stopped before the first step: nothing was trained or saved"
                return
            self.offer_trained(out, reading)
            self.status.value = f"stopped at step {run['trainer'].step}; saved {out}"

        def ended():
            self.train.enabled, self.stop.enabled = True, False
            if not run.get("said") and "trainer" in run and out.is_file():
                done(out)  # Stop pressed while the final save ran: superqt then reports neither

        def failed(err):
            from .workers import error_text

            run["said"] = True
            text = error_text(err)
            if run.get("saved"):
                text += f"; what was learned is saved in {out}"
            elif out.is_file():  # the save after the error failed too: the last save on the way stays
                text += f"; {out} keeps the run up to its last save (every {training_run.SAVE_EVERY} steps)"
            if out.is_file():
                self.offer_trained(out, reading)
            self.status.value = text

        self.train.enabled, self.stop.enabled = False, True
        self.status.value = f"training on {len(train)} plane(s), validating on {len(val)}..."
        self.worker = self.workers.steps(work, desc="training", show=show, done=done, failed=failed,
                                         progress_of=lambda r: (r.step, run["trainer"].config.steps), ended=ended)
        self.worker.aborted.connect(save_stopped)  # not through workers.gui: the widget may be gone
        self.worker.aborted.connect(self.workers.gui(stopped))
        return self.worker

    def offer_trained(self, path, reading) -> None:
        """A saved model offered for annotation (read as it was trained: ``reading``), and
        the next run's file named beside it, never over it."""
        self.model, self.reading = path, reading
        self.use.enabled = True
        self.out.value = free_name(path)

    def use_model(self):
        """Open (or find) the Segment Anything widget and start it with the trained model."""
        if not self.model:
            return None
        _, widget = self.viewer.window.add_plugin_dock_widget("napari-sam-scale", "Segment Anything")
        widget.model.value = CHECKPOINT
        widget.checkpoint.value = self.model
        if self.reading is not None:
            # The same reading as in training. The model's advice would mostly agree (the saved
            # model advises what it learned), but it reads a plane as a stain only where the
            # plane looks like brightfield, and a user who chose the stain may know better.
            widget.rgb_reading.value = self.reading
        if self.image.value is not None:
            widget.image.value = self.image.value
        widget.start_session()
        return widget
