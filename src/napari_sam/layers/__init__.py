"""napari layers <-> the core: prompt layers, coordinates, preview and labels layers.

:mod:`~napari_sam.layers.prompt_layers` turns napari's points and boxes into
:class:`~napari_sam.core.prompts.Prompt` values (napari's (row, col) becomes (x, y) there
and nowhere else); :mod:`~napari_sam.layers.session` drives an
:class:`~napari_sam.api.Annotator` from them. :func:`attach` is the entry point from the
napari console.

It needs napari (the ``napari`` extra); without it, importing this package fails at once
with one line that says so and gives the command that installs it.
"""

from .._extras import require

require("napari_sam.layers", ("napari",))

# after the check, so that a missing napari is reported by it and not by a submodule
from .attachment import attach  # noqa: E402
from .keys import KEYS  # noqa: E402
from .prompt_layers import source_from_layer  # noqa: E402
from .session import ViewerSession  # noqa: E402

__all__ = ["KEYS", "ViewerSession", "attach", "source_from_layer"]
