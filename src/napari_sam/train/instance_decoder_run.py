"""Giving a model a new instance decoder from a user's labelled planes, as
``napari-sam train --mode instance-decoder`` and the training widget both do: the data
read as the model reads them, tiled as AIS reads them, the run, and the saved result.

A fine-tune of the whole model leaves its instance decoder out (the decoder read the old
encoder's embeddings), and SAM's and most other checkpoints never had one; this gives
either one, as micro-sam's trainer does. The SAM weights are written back unchanged, with
the decoder beside them (:func:`~napari_sam.train.instance_decoder.save_with_instance_decoder`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Generator
from pathlib import Path

from ..model import Sam
from .dataset import SegmentationDataset
from .instance_decoder import DecoderTrainingConfig, DecoderTrainingProgress

__all__ = ["DEFAULT_STEPS", "InstanceDecoderRun", "read_run_settings", "run_folder", "write_run_settings"]

DEFAULT_STEPS = 3000
"""Decoder steps of a run that names none (the default model's took 4000, 14 minutes on a
2-core CPU)."""


def run_folder(out: str | os.PathLike) -> Path:
    """Where a run writing ``out`` keeps its state (the last and best decoder, written at
    every validation) until it finishes."""
    out = Path(out)
    return out.with_name(out.name + ".instance_decoder_run")


_SETTINGS = "run.json"


def write_run_settings(folder: str | os.PathLike, settings: dict) -> None:
    """Record in a run's folder what it was started with (plain JSON values: the model, the
    steps, the learning rate, the seed, how the planes were read), whole or not at all, so
    that whoever continues it continues the same run."""
    import json

    path = Path(folder) / _SETTINGS
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings))
    os.replace(tmp, path)


def read_run_settings(folder: str | os.PathLike) -> dict | None:
    """What the run in ``folder`` was started with (:func:`write_run_settings`), or None
    where the folder holds no such record.

    Raises
    ------
    ValueError
        For a record that cannot be read as one.
    """
    import json

    path = Path(folder) / _SETTINGS
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read ({err}): remove {Path(folder)} to start the run over") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is not a run's settings: remove {Path(folder)} to start the run over")
    return settings


class InstanceDecoderRun:
    """One run that trains a new instance decoder on ``model``'s frozen embeddings.

    Parameters
    ----------
    model
        The SAM (float32) the decoder will read; its weights are not changed.
    data
        The labelled planes, read as the model reads them (a stained RGB plane read
        otherwise than the model's stain advice is refused: the decoder must learn what
        AIS will give it).
    out
        The checkpoint the run will write.
    folder
        Where the run keeps its state, and where a run of the same settings resumes; by
        default :func:`run_folder` of ``out``.
    validation
        Planes to validate on; None keeps 10 % of ``data``'s planes, whole (a plane's
        tiles overlap, and would validate on what trained).
    steps, learning_rate, seed
        The decoder's training (:class:`~napari_sam.train.instance_decoder.DecoderTrainingConfig`).

    Raises
    ------
    ValueError
        For planes read otherwise than the model reads them.
    """

    def __init__(self, model: Sam, data: SegmentationDataset, out: str | os.PathLike,
                 validation: SegmentationDataset | None = None, steps: int = DEFAULT_STEPS,
                 learning_rate: float = DecoderTrainingConfig.learning_rate, seed: int = 0,
                 folder: str | os.PathLike | None = None):
        from .tiles import inference_tiles

        problem = self.reading_problem(model, data.channel)
        if problem:
            raise ValueError(f"{problem}: read the planes as the model does, or fine-tune the model with this "
                             "reading first")
        if validation is None:
            data, validation = data.split(0.1, seed=seed) if len(data) > 1 else (data, None)
        # AIS reads this decoder's maps from embeddings at the plane's own scale (auto.modes.reads_native_scale)
        self.train = inference_tiles(data, model.config.image_size, magnification=1.0)
        self.validation = (None if validation is None
                           else inference_tiles(validation, model.config.image_size, magnification=1.0))
        self.model, self.out = model, Path(out)
        self.folder = run_folder(out) if folder is None else Path(folder)
        self.config = DecoderTrainingConfig(steps=int(steps), learning_rate=float(learning_rate), seed=int(seed),
                                            warmup_steps=min(100, max(1, steps // 10)),
                                            validate_every=min(250, max(1, steps // 10)))
        self.decoder = None  # the finished run's best decoder
        self.done = 0  # training steps done
        self.best_step: int | None = None
        self._checkpointed = False  # a checkpoint written by this run, not one it resumed from

    @staticmethod
    def reading_problem(model: Sam, channel) -> str | None:
        """Why planes read through ``channel`` (as :class:`SegmentationDataset` takes it) cannot
        train ``model``'s instance decoder, or None: the decoder must learn what AIS will
        give it, stained RGB read as the model's stain advice says."""
        from .checkpoints import learned_stain

        advice = model.metadata.get("stain")
        if learned_stain(advice, channel) == advice:
            return None
        return ("the instance decoder reads the image as the model reads it "
                f"({'its haematoxylin stain' if advice else 'the colours'} for stained RGB)")

    def steps(self) -> Generator[DecoderTrainingProgress, None, None]:
        """Embed the tiles, then train, yielding after every batch embedded and every step;
        closing it stops the run, which :meth:`save` then saves with its best decoder so far."""
        from .instance_decoder import iter_train_instance_decoder

        self.folder.mkdir(parents=True, exist_ok=True)
        run = iter_train_instance_decoder(self.model, self.train, self.validation, self.config, self.folder)
        try:
            while True:
                try:
                    report = next(run)
                except StopIteration as end:
                    self.decoder = end.value
                    if self.best_step is None:  # resumed after its last step: the folder says which it kept
                        self._read_folder()
                    return
                if report.stage == "train":
                    every = self.config.validate_every
                    self._checkpointed |= report.step % every == 0 or report.step == self.config.steps
                    self.done = report.step
                    self.best_step = report.best_step if report.best_step is not None else self.best_step
                yield report
        finally:
            run.close()  # the state of the last validation stays in the run folder

    @property
    def finished(self) -> bool:
        """Whether the run took all its steps."""
        return self.decoder is not None

    @property
    def has_decoder_to_save(self) -> bool:
        """Whether this run has a decoder of its own to save: it finished, or wrote a
        checkpoint since it started (at a validation, or the step it would have validated
        at). A resumed run has not until its first new checkpoint, so that a time limit
        never stops it where it stood."""
        return self.finished or self._checkpointed

    def save(self, model_name: str, command: str) -> Path | None:
        """Write :attr:`out`: the SAM with the finished run's decoder, or a stopped run's best
        (else last) decoder so far. A finished run's folder is removed, and so is the folder
        of a run stopped before its first validation, which has nothing to save or continue
        from (then None is returned).

        ``model_name`` and ``command`` go into the provenance
        (``metadata["instance_decoder"]``). The model then advises AIS with micro-sam's
        settings: an earlier decoder's tuned settings go; its detector and grid advice stay.
        """
        from .instance_decoder import save_with_instance_decoder

        decoder = self.decoder if self.decoder is not None else self._saved_decoder()
        if decoder is None:
            shutil.rmtree(self.folder, ignore_errors=True)
            return None
        automatic = {k: v for k, v in (self.model.metadata.get("automatic") or {}).items() if k in ("detector", "grid")}
        provenance = {"command": command, "model": model_name, "config": self.config.as_dict(),
                      "data": self.train.describe(),
                      "validation": None if self.validation is None else self.validation.describe(),
                      "steps": self.config.steps if self.finished else self.done, "best_step": self.best_step,
                      "date": time.strftime("%Y-%m-%d %H:%M:%S"), "scale_matched": False}
        save_with_instance_decoder(self.model, decoder, self.out, provenance, dict(automatic, mode="ais"))
        if self.finished:
            shutil.rmtree(self.folder, ignore_errors=True)
        return self.out

    def _read_folder(self) -> dict:
        """The best and the last checkpoint the run folder holds, by file name; the steps
        done and kept are taken from them where this run has not reported its own (a
        resumed run stopped while it embedded, or resumed after its last step)."""
        import torch

        from .instance_decoder import BEST, LAST

        saved = {name: torch.load(self.folder / name, map_location=self.model.device, weights_only=True)
                 for name in (BEST, LAST) if (self.folder / name).is_file()}
        if LAST in saved:
            self.done = max(self.done, int(saved[LAST]["step"]))
        if BEST in saved and self.best_step is None:
            self.best_step = int(saved[BEST]["step"])
        return saved

    def _saved_decoder(self):
        """The best (else the last) decoder the run folder holds; None before the first
        validation."""
        from ..model.instance_decoder import InstanceDecoder
        from .instance_decoder import BEST, LAST

        saved = self._read_folder()
        if not saved:
            return None
        state = saved.get(BEST, saved.get(LAST))
        decoder = InstanceDecoder(self.config.decoder_config(self.model.config.prompt_embed_dim))
        decoder.to(self.model.device).load_state_dict(state["decoder"])
        return decoder.eval()
