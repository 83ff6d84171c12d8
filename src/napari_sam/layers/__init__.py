"""napari layers <-> the core: prompt layers, coordinates, preview and labels layers.

:mod:`~napari_sam.layers.prompt_layers` turns napari's points and boxes into
:class:`~napari_sam.core.prompts.Prompt` values (napari's (row, col) becomes (x, y) there
and nowhere else); :mod:`~napari_sam.layers.session` drives an
:class:`~napari_sam.api.Annotator` from them. :func:`attach` is the entry point from the
napari console.
"""

from .prompt_layers import source_from_layer
from .session import KEYS, ViewerSession, attach

__all__ = ["KEYS", "ViewerSession", "attach", "source_from_layer"]
