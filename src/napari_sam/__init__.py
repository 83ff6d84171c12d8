"""napari-sam-scale: Segment Anything for scientific imaging.

The package is layered: :mod:`napari_sam.model` (torch only) holds SAM itself,
:mod:`napari_sam.core` the headless machinery (preprocessing, prediction, loading, I/O),
:mod:`napari_sam.cli` the command line, and the napari plugin sits on top. Importing
this package loads neither torch nor Qt.
"""

__version__ = "0.1.0"
