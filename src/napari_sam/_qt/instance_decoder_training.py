"""The training widget's instance-decoder mode: a new instance decoder for "Segment
everything" (AIS, APG) trained on the chosen model's frozen embeddings of the annotated
planes (:class:`~napari_sam.train.instance_decoder_run.InstanceDecoderRun`, as
``napari-sam train --mode instance-decoder``), in a worker with progress, the loss curve
and Stop, the SAM saved with the best decoder however the run ends."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .training import TrainingWidget

__all__ = ["start_instance_decoder"]


def start_instance_decoder(widget: TrainingWidget, data, base: str, out: Path, reading, steps: int, minutes: float,
                           seed: int):
    """Train a new instance decoder on the model's frozen embeddings of the planes, for
    ``steps`` or until Stop or the minutes run out (once it has a decoder to save), and
    save the SAM with it: also when stopped, closed mid-run or failing (the best decoder
    so far). A run of the same settings whose state waits beside ``out`` (napari killed
    mid-run, a save that failed) is continued; one of other settings is refused."""
    import shutil
    import time

    from ..core.models import resolve_model
    from ..train.instance_decoder import DecoderTrainingConfig
    from ..train.instance_decoder_run import InstanceDecoderRun, run_folder, write_run_settings

    # The run's state lives beside the model it will write until the run has saved it:
    # napari killed outright leaves it there, and a run of the same settings into the same
    # file continues from its last validation.
    folder = run_folder(out)
    settings = {"model": base, "steps": int(steps), "learning_rate": DecoderTrainingConfig.learning_rate,
                "seed": int(seed), "channel": data.channel}
    resumed = folder.exists()
    problem = _other_run(folder, settings) if resumed else None
    if problem:
        widget.status.value = f"cannot train: {problem}"
        return None
    widget.curve.clear()
    widget.trainer = None
    run: dict = {}  # this run, for a save that needs no widget (it may close mid-run)
    command = "napari-sam training widget, instance decoder"

    def work():
        model = resolve_model(base, device="auto", dtype="float32")
        problem = InstanceDecoderRun.reading_problem(model, data.channel)
        if problem:
            raise ValueError(f"{problem}: choose \"model's advice\" under \"RGB read as\"")
        run["run"] = InstanceDecoderRun(model, data, out, steps=steps, seed=seed, folder=folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_run_settings(folder, settings)
        started, reports = time.monotonic(), run["run"].steps()
        try:
            for report in reports:
                yield report
                if time.monotonic() - started > 60 * minutes and run["run"].has_decoder_to_save:
                    reports.close()  # out of time, with a decoder to save: the best so far
                    break
        except Exception:
            save_stopped()  # what was learned is kept; the error is said as it is
            raise
        try:
            return save()
        except Exception as err:
            run["save_error"] = kept_state(err)
            raise

    def save():
        """Write ``out`` once; the run's folder goes only when nothing in it is needed."""
        if "saved" not in run:
            run["saved"] = run["run"].save(base, command)
            shutil.rmtree(run["run"].folder, ignore_errors=True)
        return run["saved"]

    def kept_state(err) -> str:
        return f"{' '.join(str(err).split())[:200]}; the run's state is kept in {run['run'].folder}"

    def save_stopped():
        if "run" in run:
            try:
                save()
            except Exception as err:  # noqa: BLE001 - said on the status line, the run's state kept
                run["save_error"] = kept_state(err)

    def show(report):
        if report.stage == "embed":
            widget.status.value = f"embedding tiles {report.step}/{report.steps}"
            return
        widget.show_step(report.step, report.loss, "validation loss", report.validation_loss)

    def said(saved) -> str:
        decoder_run = run["run"]
        if "save_error" in run:
            return f"stopped after step {decoder_run.done}; could not save {out}: {run['save_error']}"
        if saved is None:
            return (f"stopped after {decoder_run.done} step(s), before the first validation: nothing was "
                    "saved")
        text = f"saved {saved}: the SAM with an instance decoder"
        if decoder_run.best_step is not None:
            text += f" (the decoder of step {decoder_run.best_step}, best on validation)"
        if not decoder_run.finished:
            text += f"; stopped after step {decoder_run.done} of {decoder_run.config.steps}"
        return text + "; \"Segment everything\" offers AIS with it"

    def done(saved):
        run["said"] = True
        widget.status.value = said(saved)
        if saved is not None:
            widget.offer_trained(saved, reading)

    def stopped():
        if "run" not in run:
            run["said"] = True
            widget.status.value = "stopped before the first step: nothing was trained or saved"
            return
        done(run.get("saved"))

    def ended():
        widget.train.enabled, widget.stop.enabled = True, False
        if not run.get("said") and "saved" in run:
            done(run["saved"])  # Stop pressed while the final save ran: superqt then reports neither

    def progress_of(report):
        return (report.step, report.steps) if report.stage == "embed" else (report.step, run["run"].config.steps)

    def failed(err):
        from .workers import error_text

        run["said"] = True
        text = error_text(err)
        if run.get("saved"):
            text += f"; the best decoder so far is saved in {run['saved']}"
            widget.offer_trained(run["saved"], reading)
        elif "save_error" in run:
            text += f"; {out.name} was not saved ({run['save_error']})"
        widget.status.value = text

    widget.train.enabled, widget.stop.enabled = False, True
    widget.status.value = (f"an instance decoder for {base}: "
                           + (f"continuing the stopped run in {folder}, " if resumed else "")
                           + f"reading {len(data)} plane(s)...")
    widget.worker = widget.workers.steps(work, desc="instance decoder", show=show, done=done,
                                         progress_of=progress_of, failed=failed, ended=ended)
    widget.worker.aborted.connect(save_stopped)  # not through workers.gui: the widget may be gone
    widget.worker.aborted.connect(widget.workers.gui(stopped))
    return widget.worker


def _other_run(folder: Path, settings: dict) -> str | None:
    """Why the run whose state waits in ``folder`` is not the one ``settings`` start, or None."""
    from ..train.instance_decoder_run import read_run_settings

    what = "choose another name to save as, or remove that folder"
    try:
        saved = read_run_settings(folder)
    except ValueError as err:
        return str(err)
    if saved is None:
        return f"{folder} holds a run's state without its settings: {what}"
    names = {"model": "model", "steps": "steps", "seed": "seed", "channel": "RGB read as",
             "learning_rate": "learning rate"}

    def said(value):
        return "the model's advice" if value is None else value

    differ = [f"{names[k]} {said(saved.get(k))}" for k in settings if saved.get(k) != settings[k]]
    if differ:
        return (f"{folder} holds a stopped run of other settings ({', '.join(differ)}): train with those to go on, "
                f"or {what}")
    return None

