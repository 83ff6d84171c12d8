"""`napari-sam info`: what it says it checked (finding 5 of the "hostile first week" issue)."""

import numpy as np
import zarr

from napari_sam.cli import main


def _embedded(tmp_path, tiny_checkpoint, nuclei_3d, capsys):
    vol = tmp_path / "vol.zarr"
    z = zarr.create_array(str(vol), shape=(1, 80, 80), dtype="uint8", chunks=(1, 40, 40))
    z[...] = nuclei_3d[0][:1, :80, :80]
    cache = tmp_path / "cache.zarr"
    assert main(["embed", str(vol), "--model", str(tiny_checkpoint), "--dtype", "float32", "--tile", "40",
                 "--halo", "8", "--out", str(cache)]) == 0
    capsys.readouterr()
    return cache


def test_info_says_counted_not_checked_and_verify_lists_damaged_and_missing_tiles(
        tmp_path, tiny_checkpoint, nuclei_3d, capsys):
    cache = _embedded(tmp_path, tiny_checkpoint, nuclei_3d, capsys)
    assert main(["info", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "4/4 present" in out and "tiles counted, not checked" in out
    assert "image fingerprint: store listing (5 files: names, sizes, mtimes) + 4 sampled chunks" in out
    assert main(["info", str(cache), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "4 tile(s) read: 0 damaged, 0 missing" in out and "not checked" not in out

    key = out.split("]")[0].lstrip("[")
    features = cache / key / "features" / "c"
    (features / "0" / "0" / "1" / "0" / "0" / "0").write_bytes(np.random.default_rng(0).bytes(3000))
    (features / "0" / "1" / "0" / "0" / "0" / "0").unlink()
    assert main(["info", str(cache)]) == 0  # counting cannot see it, and says so
    out = capsys.readouterr().out
    assert "4/4 present" in out and "not checked" in out
    assert main(["info", str(cache), "--verify"]) == 3  # 1 is a bug, 2 a mistake in the request
    out = capsys.readouterr().out
    assert "4 tile(s) read: 1 damaged, 1 missing" in out
    assert "damaged   plane 0, tile row 0, col 1" in out and "missing   plane 0, tile row 1, col 0" in out
    assert "2 tile(s) damaged or missing" in out
