"""Results as markdown tables: one table per kind of evaluation, one row per method."""

from __future__ import annotations

import numpy as np

__all__ = ["format_table"]


def _fmt(v) -> str:
    if v is None or isinstance(v, float) and np.isnan(v):  # no object to score: as the JSON's null
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _automatic(rs: list[dict]) -> str:
    # Columns stay in this order: the scores first, then times and settings, which older
    # results (before times were measured) lack and show as "-".
    rows = [
        [r["method"], r["images"], r["msa"], r["ap50"], r["ap75"], r.get("seconds_per_plane"),
         r.get("embedding_seconds_per_plane"), r.get("settings_text")]
        for r in rs
    ]
    header = ["method", "images", "mSA", "AP50", "AP75", "s/plane", "embed s/plane", "settings"]
    return (
        "Automatic segmentation (AP = TP / (TP + FP + FN), DSB 2018; s/plane: the mode's own work, mean "
        "seconds per plane; embed s/plane: the image encoder, once per plane, shared by SAM's modes)\n\n"
        + _table(header, rows)
    )


def format_table(results) -> str:
    """A markdown table (plain text that reads well as is) of one or more results.

    Parameters
    ----------
    results
        A results dict of :func:`~napari_sam.evaluate.evaluate_prompted`,
        :func:`~napari_sam.evaluate.evaluate_automatic` or
        :func:`~napari_sam.evaluate.evaluate_propagation`, or a list of them (one row per
        method; one table per kind, in the order the kinds first appear).

    Returns
    -------
    str
    """
    results = [results] if isinstance(results, dict) else list(results)
    kinds: dict[str, list[dict]] = {}
    for r in results:
        if not isinstance(r, dict) or r.get("kind") not in ("prompted", "automatic", "propagation"):
            raise ValueError(
                "format_table takes results of evaluate_prompted, evaluate_automatic or evaluate_propagation"
            )
        kinds.setdefault(r["kind"], []).append(r)
    tables = []
    for kind, rs in kinds.items():
        if kind == "prompted":
            n = max(len(r["iterative"]) for r in rs)
            header = ["method", "images", "objects", "point", "box"] + [f"+{k} corr." for k in range(1, n)]
            rows = [[r["method"], r["images"], r["objects"], r["point"], r["box"], *r["iterative"][1:]] for r in rs]
            tables.append("Prompted segmentation: mean IoU per object\n\n" + _table(header, rows))
        elif kind == "automatic":
            tables.append(_automatic(rs))
        else:
            rows = [[r["method"], r["objects"], r["mean_iou"]] for r in rs]
            header = ["method", "objects", "mean 3D IoU"]
            tables.append("Propagation: mean 3D IoU per object\n\n" + _table(header, rows))
    return "\n\n".join(tables)
