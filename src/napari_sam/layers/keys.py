"""The keyboard shortcuts of a viewer session, bound on the viewer while it is attached."""

from __future__ import annotations

__all__ = ["KEYS", "bind_keys", "step_planes", "unbind_keys"]

KEYS = {
    "commit": "Shift-C",
    "clear": "Shift-X",
    "toggle": "Shift-T",
    "undo": "Shift-U",
    "next": "Shift-N",
    "previous": "Shift-P",
}
"""Keyboard shortcuts, bound on the viewer while a session is attached."""


def bind_keys(viewer, session) -> None:
    """Bind :data:`KEYS` on ``viewer`` to ``session``'s steps (a
    :class:`~napari_sam.layers.session.ViewerSession`; an earlier session's keys are replaced)."""
    actions = {
        "commit": lambda viewer: session.commit(),
        "clear": lambda viewer: session.clear_prompts(),
        "toggle": lambda viewer: session.toggle_mode(),
        "undo": lambda viewer: session.undo(),
        "next": lambda viewer: session.step(1),
        "previous": lambda viewer: session.step(-1),
    }
    for name, key in KEYS.items():
        viewer.bind_key(key, actions[name], overwrite=True)


def unbind_keys(viewer) -> None:
    """Free :data:`KEYS` on ``viewer`` (the widget that bound them was closed)."""
    for key in KEYS.values():
        viewer.bind_key(key, None, overwrite=True)


def step_planes(viewer, image_layer, delta: int) -> None:
    """Go ``delta`` planes along the innermost plane axis (Z, else T) of ``image_layer``."""
    n = image_layer.ndim - 2
    if n == 0:
        return
    axis = viewer.dims.ndim - image_layer.ndim + n - 1
    current = viewer.dims.current_step[axis]
    viewer.dims.set_current_step(axis, max(0, current + delta))
