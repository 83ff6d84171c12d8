"""Segment everything from the viewer: the modes a model offers as a menu, the rough
Labels layer of the "labels" mode, and how far a run over a slice or a stack has got.

The work itself is :meth:`napari_sam.api.Annotator.segment_everything_steps` (every mode
through :mod:`napari_sam.auto.modes`); :meth:`ViewerSession.segment_everything
<napari_sam.layers.session.ViewerSession.segment_everything>` hands it the session's
plane, overwrite setting and layers.
"""

from __future__ import annotations

from ..auto.modes import available_modes
from ..auto.results import Progress
from .prompt_layers import full_resolution

__all__ = ["MODE_NAMES", "EverythingProgress", "mode_choices", "rough_labels"]

MODE_NAMES = {
    "ais": "instance decoder (AIS)",
    "apg": "decoder prompts (APG)",
    "auto": "point grid (SAM)",
    "boxes": "detector boxes",
    "labels": "objects of a Labels layer",
}
"""What a menu calls each mode."""


def mode_choices(model=None) -> list[tuple[str, str]]:
    """(name, mode) of the modes a model offers (:func:`~napari_sam.auto.modes.available_modes`;
    without a model, those every model has), then the refinement of a Labels layer."""
    modes = ("auto", "boxes") if model is None else available_modes(model)
    return [(MODE_NAMES[m], m) for m in (*modes, "labels")]


def rough_labels(rough, shape: tuple[int, ...]):
    """The rough segmentation of the ``"labels"`` mode, checked against the image.

    Parameters
    ----------
    rough
        A Labels layer (its full-resolution level if multiscale) or an array.
    shape
        The image's labels shape (planes, then Y, X).

    Returns
    -------
    array-like
        Its data.

    Raises
    ------
    ValueError
        Nothing given, or a shape that does not match the image.
    """
    if rough is None:
        raise ValueError("choose the Labels layer whose objects are to be refined")
    data = full_resolution(rough) if hasattr(rough, "multiscale") else rough  # a layer, or an array
    name = getattr(rough, "name", "the rough labels")
    if tuple(data.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(data.shape)}, but the image's labels need {tuple(shape)}")
    return data


class EverythingProgress:
    """One progress bar over a run: a slice's tiles (or boxes), or, over a stack, the
    planes with the current plane's tiles as the fraction of the next.

    Parameters
    ----------
    n_planes
        Planes of the run (1 for a slice).
    """

    STEPS = 100
    """Bar steps per plane."""

    def __init__(self, n_planes: int):
        self.n_planes = n_planes
        self.planes_done = 0

    def of(self, report: Progress) -> tuple[int, int]:
        """(done, total) of the bar after ``report``."""
        if report.stage == "planes":
            self.planes_done = report.done
            return report.done * self.STEPS, report.total * self.STEPS
        part = report.done / report.total if report.total else 0.0
        return int((self.planes_done + part) * self.STEPS), self.n_planes * self.STEPS

    def text(self, report: Progress) -> str:
        """One status line for ``report``."""
        if self.n_planes == 1:
            return f"segmenting everything: {report.done}/{report.total} {report.stage}"
        plane = min(self.planes_done + (report.stage != "planes"), self.n_planes)
        return f"segmenting everything: slice {plane}/{self.n_planes}" + (
            "" if report.stage == "planes" else f", {report.done}/{report.total} {report.stage}")
