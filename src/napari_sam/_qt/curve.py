"""A small live line plot (loss and validation IoU while training), drawn with QPainter:
the plugin needs one curve, not a plotting library."""

from __future__ import annotations

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["CurveWidget"]


class CurveWidget(QWidget):
    """Named series of (x, y) points, each scaled to its own range (said in the legend),
    over the steps (said below)."""

    COLORS = ("#f0a030", "#40c0ff", "#80e080")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)

    def add(self, name: str, x: float, y: float) -> None:
        self.series.setdefault(name, []).append((float(x), float(y)))
        self.update()

    def clear(self) -> None:
        self.series.clear()
        self.update()

    def paintEvent(self, event):  # noqa: N802 - Qt's name
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        w, h, pad = self.width(), self.height(), 6
        painter.fillRect(self.rect(), QColor("#262930"))
        xs = [x for pts in self.series.values() for x, _ in pts]
        if not xs:
            painter.setPen(QColor("#a0a0a0"))
            painter.drawText(self.rect(), Qt.AlignCenter, "loss and validation IoU appear here")
            return
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        top, bottom = 4 + 14 * len(self.series), 14  # a legend line per series above, the steps below
        for k, (name, pts) in enumerate(self.series.items()):
            ys = [y for _, y in pts]
            y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
            color = QColor(self.COLORS[k % len(self.COLORS)])
            painter.setPen(QPen(color, 1.5))
            points = [
                QPointF(pad + (x - x0) / (x1 - x0) * (w - 2 * pad),
                        h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom - pad))
                for x, y in pts
            ]
            for a, b in zip(points, points[1:]):
                painter.drawLine(a, b)
            if len(points) == 1:
                painter.drawEllipse(points[0], 2, 2)
            # each series has its own scale: its range is said, so two points never pass for a big change
            painter.drawText(pad, 12 + 14 * k, f"{name} {ys[-1]:.3f} (range {min(ys):.3f}-{max(ys):.3f})")
        painter.setPen(QColor("#a0a0a0"))
        painter.drawText(pad, h - 2, f"step {min(xs):g}")
        painter.drawText(self.rect().adjusted(0, 0, -pad, -2), Qt.AlignRight | Qt.AlignBottom, f"step {max(xs):g}")
