"""Qt widgets of the napari plugin (imported only by napari, never by the core).

They need the ``napari`` extra (napari, magicgui, qtpy and a Qt binding); without it,
importing this package fails at once with one line that names what is missing and the
command that installs it, instead of a traceback from deep inside a widget module.
"""

from .._extras import require

require("the napari plugin (napari_sam._qt)", ("napari", "magicgui", "qtpy"), qt=True)
