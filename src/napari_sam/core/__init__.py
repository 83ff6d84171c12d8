"""The headless interactive path: everything between an image and an object's mask.

One idea a module: an image as planes (``image_source``, ``io``), the model and its
process settings (``models``, ``runtime``), one plane's prediction (``preprocess``,
``image_embedding``, ``predictor``), large planes as tiles and their cache (``tiling``,
``embeddings``, ``embedding_store``, ``signature``, ``sampling``, ``distributed``), prompts
and masks (``prompts``, ``masks``, ``tiled_segmentation``), and what becomes of an answer
(``labels``, ``propagation``). ``pairs`` and ``prompt_simulation`` serve training and
evaluation. Nothing here imports napari or Qt.
"""
