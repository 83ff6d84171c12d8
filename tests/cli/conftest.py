"""What the command-line tests share."""

import pytest
import tifffile


@pytest.fixture
def pairs_folder(nuclei_2d):
    """A function that writes ``n`` 128 x 128 pieces of the bundled nuclei image and their
    labels as a training folder (``images/``, ``labels/``) under ``root``, and returns it."""
    image, labels = nuclei_2d

    def write(root, n=3):
        for d in ("images", "labels"):
            (root / d).mkdir(parents=True)
        for i in range(n):
            tifffile.imwrite(root / "images" / f"p{i}.tif", image[i * 128:(i + 1) * 128, :128])
            tifffile.imwrite(root / "labels" / f"p{i}.tif", labels[i * 128:(i + 1) * 128, :128])
        return root

    return write
