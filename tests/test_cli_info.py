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


def test_info_and_caches_speak_json_for_scripts(tmp_path, tiny_checkpoint, nuclei_3d, capsys, monkeypatch):
    import json
    import time

    from tests.core.test_cache_housekeeping import _folder

    cache = _embedded(tmp_path, tiny_checkpoint, nuclei_3d, capsys)
    assert main(["info", str(cache), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (entry,) = report["entries"]
    assert report["cache"] == str(cache) and entry["present"] == entry["total"] == 4 and entry["check"] is None
    assert entry["signature"]["tile"] == 40 and entry["layout"] == [1, 2, 2] and entry["bytes"] > 0
    key = entry["key"]
    (cache / key / "features" / "c" / "0" / "1" / "0" / "0" / "0" / "0").unlink()
    assert main(["info", str(cache), "--verify", "--json"]) == 3  # the same status as the text
    check = json.loads(capsys.readouterr().out)["entries"][0]["check"]
    assert check == {"checked": 4, "damaged": [], "missing": [[0, 1, 0]]}

    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path / "user"))
    folder, old, mid, new = _folder(tmp_path / "user", time.time())
    assert main(["caches", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in listing["caches"]] == ["old.zarr", "mid.zarr", "new.zarr"]
    assert listing["bytes"] == sum(c["bytes"] for c in listing["caches"]) > 0
    assert listing["caches"][0]["last_used"].endswith("+00:00") and listing["caches"][0]["busy"] is False
    assert main(["caches", "--older-than", "5", "--dry-run", "--json"]) == 0
    removed = json.loads(capsys.readouterr().out)
    assert removed["dry_run"] is True and [c["name"] for c in removed["removed"]] == ["old.zarr", "mid.zarr"]
    assert removed["bytes_left"] == listing["bytes"] - removed["bytes_removed"] and old.is_dir()
