"""`napari-sam caches`: the user cache folder's embedding caches listed and pruned."""

import time

import pytest

from napari_sam.cli import main
from tests.core.test_cache_housekeeping import _folder


def test_the_caches_command_lists_and_removes(tmp_path, monkeypatch, capsys):
    now = time.time()
    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path))
    assert main(["caches"]) == 0
    assert "no embedding caches" in capsys.readouterr().out
    folder, old, mid, new = _folder(tmp_path, now)
    assert main(["caches"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:3]] == ["old.zarr", "mid.zarr", "new.zarr"]
    assert "vit_t, 2x700x900 ZYX" in out[0] and out[-1].startswith("3 cache(s), ")
    assert main(["caches", "--older-than", "30", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("would remove old.zarr (") and old.is_dir()
    assert main(["caches", "--older-than", "5"]) == 0
    out = capsys.readouterr().out
    assert "removed old.zarr" in out and "removed mid.zarr" in out and "removed 2 cache(s)" in out
    assert not old.exists() and not mid.exists() and new.is_dir()
    with pytest.raises(SystemExit):
        main(["caches", "--older-than", "-1"])
    assert "-1 is not a positive number" in capsys.readouterr().err
