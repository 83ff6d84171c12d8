import dataclasses

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_sam.core.signature import CacheSignature, describe_fingerprint, fingerprint


class CountingArray:
    """Wraps an array and records how many elements were read."""

    def __init__(self, data, chunks):
        self.data, self.chunks = data, chunks
        self.shape, self.dtype = data.shape, data.dtype
        self.read = 0

    def __getitem__(self, idx):
        out = self.data[idx]
        self.read += out.size
        return out


def test_fingerprint_reads_a_sample_not_the_volume():
    vol = CountingArray(np.random.default_rng(0).integers(0, 60000, (64, 256, 256), dtype=np.uint16), (1, 64, 64))
    fingerprint(vol)
    assert 0 < vol.read <= 16 * 64 * 64 < vol.data.size / 50


def test_fingerprint_sees_changes_in_sampled_chunks_and_metadata(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (8, 128, 128), dtype=np.uint8)
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=data.shape, dtype=data.dtype, chunks=(1, 64, 64))
    z[...] = data
    base = fingerprint(z)
    assert fingerprint(z) == base  # deterministic
    assert fingerprint(da.from_zarr(str(tmp_path / "a.zarr"))) == fingerprint(da.from_zarr(str(tmp_path / "a.zarr")))
    z[0, 0, 0] = data[0, 0, 0] ^ 1  # the first chunk is always sampled
    assert fingerprint(z) != base
    assert fingerprint(data.astype(np.uint16)) != fingerprint(data)
    assert fingerprint(data[:, :64]) != fingerprint(data)


def _sig(**over):
    sig = CacheSignature(
        model="vit_b", checkpoint="sha256:00", dtype="float32",
        normalization={"mode": "auto", "low": 1.0, "high": 99.8},
        tile=1024, halo=128, shape=(10, 2048, 2048), dtype_in="uint16", axes="ZYX", image_fingerprint="blake2b:ab",
    )
    return dataclasses.replace(sig, **over)


def test_signature_round_trip_and_differences():
    sig = _sig()
    assert CacheSignature.from_json(sig.to_json()) == sig
    diffs = sig.differences(_sig(tile=512, dtype="bfloat16"))
    assert diffs == ["dtype: 'float32' (cache) vs 'bfloat16' (request)", "tile: 1024 (cache) vs 512 (request)"]
    assert sig.differences(_sig()) == []
    with pytest.raises(ValueError, match="missing \\['axes'\\]"):
        data = sig.to_json()
        del data["axes"]
        CacheSignature.from_json(data)


def test_numpy_arrays_are_hashed_whole():
    vol = np.zeros((40, 1024, 1024), np.uint8)
    base = fingerprint(vol)
    assert base.startswith("whole:") and describe_fingerprint(base) == "whole array hashed"
    vol[37, 700, 3] = 1  # a plane and a block the old sample of 16 chunks never read
    changed = fingerprint(vol)
    assert changed != base
    strided = np.zeros((40, 1024, 2048), np.uint8)[:, :, ::2]  # not contiguous: hashed plane by plane
    assert fingerprint(strided) == fingerprint(np.zeros((40, 1024, 1024), np.uint8))
    vol[37, 700, 3] = 0
    assert fingerprint(vol) == base  # the content, not the identity of the array
