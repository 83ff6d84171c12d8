"""Prompts: the points and box that describe one object, in (x, y) pixel coordinates."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import numpy as np

from .masks import PlaneMask

__all__ = ["Prompt", "check_boxes", "check_points_inside", "load_prompts"]


@dataclass(frozen=True)
class Prompt:
    """What the user said about one object on one plane: the value every layer passes down.

    Built and validated once, where the prompts enter (a viewer's layers, the command
    line, the Python API), then handed unchanged to the tiled segmentation and the
    decoder. Coordinates are plane pixels as (x, y) = (column, row).

    Attributes
    ----------
    points
        (N, 2) float64 (x, y); N may be 0.
    labels
        (N,) int64: 1 foreground, 0 background.
    box
        (4,) float64 (x0, y0, x1, y1), or None.
    previous
        An earlier answer for the same object that these prompts correct (SAM's
        interactive loop): its low-res logits become the mask prompt. None for a fresh
        object.
    """

    # The constructor also takes None, lists and tuples; __post_init__ turns them into
    # the arrays documented above, so readers may rely on these two never being None.
    points: np.ndarray = None  # type: ignore[assignment]
    labels: np.ndarray = None  # type: ignore[assignment]
    box: np.ndarray | None = None
    previous: PlaneMask | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Whatever the caller passed (lists, tuples, arrays of any dtype), the fields hold
        # the validated arrays documented above, so that a bad prompt fails here, in one
        # line, and not deep inside the tiled decoder.
        points, labels, box = _validated(self.points, self.labels, self.box)
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "box", box)

    @classmethod
    def make(cls, points=None, labels=None, box=None, previous: PlaneMask | None = None) -> Prompt:
        """Build and validate from lists or arrays; labels default to foreground
        (the same as ``Prompt(points, labels, box, previous)``).

        Raises
        ------
        ValueError
            For mismatched points and labels, labels other than 0/1, non-finite values,
            a box that is not (x0, y0, x1, y1) with x1 > x0 and y1 > y0, or an object with
            neither a box nor a foreground point.
        """
        return cls(points, labels, box, previous)

    @property
    def ambiguous(self) -> bool:
        """A single point without a box: SAM's answer is ambiguous (ask for three masks)."""
        return self.box is None and len(self.points) == 1

    def on_plane(self, shape: tuple[int, int]) -> Prompt:
        """This prompt checked against an (H, W) plane, its box clipped to it.

        Raises
        ------
        ValueError
            Naming the points outside the plane, or a box entirely outside it.
        """
        H, W = shape
        if len(self.points):
            check_points_inside(self.points, H, W)
        bx = None if self.box is None else check_boxes(self.box.reshape(1, 4), H, W)[0]
        return dataclasses.replace(self, box=bx)

    def predict_kwargs(self) -> dict:
        """``points``, ``labels`` and ``box`` for the decoder-level calls
        (:meth:`~napari_sam.core.predictor.Predictor.predict` and its baseline
        counterpart), None where absent."""
        has_points = len(self.points) > 0
        return {
            "points": self.points if has_points else None,
            "labels": self.labels if has_points else None,
            "box": self.box,
        }


def _validated(points, labels, box) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(points (N, 2) float64, labels (N,) int64, box (4,) float64 or None), checked as
    :meth:`Prompt.make` documents."""
    pts = np.zeros((0, 2)) if points is None else np.asarray(points, dtype=np.float64)
    if pts.size % 2:
        raise ValueError(f"points are (x, y) pairs, got {pts.size} number(s)")
    pts = pts.reshape(-1, 2)
    # read as floats first: casting 0.5 or NaN straight to int would pass as 0
    raw = np.ones(len(pts)) if labels is None else np.asarray(labels, dtype=np.float64).reshape(-1)
    if len(raw) != len(pts):
        raise ValueError(f"{len(pts)} point(s) but {len(raw)} label(s)")
    if not np.isin(raw, (0, 1)).all():
        raise ValueError("point labels must be 1 (foreground) or 0 (background)")
    lbl = raw.astype(np.int64)
    if not np.isfinite(pts).all():
        raise ValueError("point coordinates must be finite numbers")
    bx = None
    if box is not None:
        bx = np.asarray(box, dtype=np.float64).reshape(-1)
        if bx.shape != (4,):
            raise ValueError(f"a box is (x0, y0, x1, y1), got {bx.size} number(s)")
        if not np.isfinite(bx).all():
            raise ValueError("box coordinates must be finite numbers")
        if bx[2] <= bx[0] or bx[3] <= bx[1]:
            raise ValueError(f"boxes need x1 > x0 and y1 > y0 (x0, y0, x1, y1), got {bx.tolist()}")
    if bx is None and not (lbl == 1).any():
        raise ValueError("an object needs a box or at least one foreground point")
    return pts, lbl, bx


def load_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Read prompts from JSON: a list of objects, each with optional ``points`` ([[x, y], ...]),
    ``labels`` ([1, 0, ...]) and ``box`` ([x0, y0, x1, y1]).

    Examples
    --------
    ``[{"points": [[120, 85]]}, {"box": [10, 10, 60, 48]}, {"points": [[30, 40], [35, 60]], "labels": [1, 0]}]``

    Raises
    ------
    FileNotFoundError
        No such file (the message names it).
    ValueError
        Malformed JSON (with the line and column), or an object that is not a valid prompt;
        the message starts with the file's name.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such prompts file: {path}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"the prompts file {path} is a folder") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a JSON text file (not UTF-8)") from None
    if isinstance(data, dict):
        data = data.get("objects", [data])
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of objects")
    out = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: object {i} is a {type(obj).__name__}, not an object with points, labels, box")
        unknown = set(obj) - {"points", "labels", "box"}
        if unknown:
            raise ValueError(f"{path}: object {i} has unknown field(s) {sorted(unknown)}")
        try:
            out.append(Prompt.make(obj.get("points"), obj.get("labels"), obj.get("box")))
        except (ValueError, TypeError) as err:  # TypeError: values of the wrong kind, e.g. strings
            raise ValueError(f"{path}: object {i}: {err}") from None
    return out


def check_points_inside(pts: np.ndarray, H: int, W: int) -> None:
    """Raise ValueError naming the (x, y) points outside an H x W plane, or non-finite ones."""
    if not np.isfinite(pts).all():
        raise ValueError("point coordinates must be finite numbers")
    outside = (pts[:, 0] < 0) | (pts[:, 0] >= W) | (pts[:, 1] < 0) | (pts[:, 1] >= H)
    if outside.any():
        bad = ", ".join(f"({x:g}, {y:g})" for x, y in pts[outside][:5])
        raise ValueError(
            f"{int(outside.sum())} point(s) lie outside the {H}x{W} image (coordinates are (x, y), "
            f"x in [0, {W}), y in [0, {H})): {bad}"
        )


def check_boxes(boxes: np.ndarray, H: int, W: int) -> np.ndarray:
    """Validate (B, 4) boxes (x0, y0, x1, y1) on an H x W plane; returns them clipped to it."""
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (B, 4) as (x0, y0, x1, y1), got {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError("box coordinates must be finite numbers")
    if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
        raise ValueError(f"boxes need x1 > x0 and y1 > y0 (x0, y0, x1, y1), got {boxes.tolist()}")
    outside = (boxes[:, 2] <= 0) | (boxes[:, 0] >= W) | (boxes[:, 3] <= 0) | (boxes[:, 1] >= H)
    if outside.any():
        raise ValueError(f"box(es) {boxes[outside].tolist()} lie entirely outside the {H}x{W} image")
    return np.clip(boxes, 0, [W, H, W, H])
