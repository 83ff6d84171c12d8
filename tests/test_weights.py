"""The checkpoint registry and its cache: well-formed entries, the cache folder, and
fetching without the network (cached files, offline failures, checksum mismatches).

Nothing here downloads: addresses point at 127.0.0.1 and the downloader is replaced
wherever bytes would otherwise have to arrive."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pooch
import pytest

from napari_sam import weights
from napari_sam.weights import (
    REGISTRY,
    CheckpointDownloadError,
    ChecksumMismatchError,
    DecoderFile,
    ModelEntry,
    UnknownModelError,
    cache_dir,
    checkpoint_path,
    fetch_checkpoint,
    fetch_decoder,
    list_models,
)

UNREACHABLE = "https://127.0.0.1:9/napari-sam-test/fake.pth"  # the discard port: refused at once, stays local
PAYLOAD = b"not really a checkpoint, but bytes with a known checksum\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(weights.CACHE_ENV_VAR, str(folder))
    return folder


def register(monkeypatch, payload=PAYLOAD, url=UNREACHABLE, name="fake"):
    entry = ModelEntry(
        name=name,
        config="vit_b",
        url=url,
        known_hash="sha256:" + hashlib.sha256(payload).hexdigest(),
        filename=f"{name}.pth",
        description="a test entry",
        licence="CC0-1.0",
    )
    monkeypatch.setitem(REGISTRY, name, entry)
    return entry


def forbid_downloads(monkeypatch):
    def downloader(progress):
        def download(url, output_file, pooch_instance):
            raise AssertionError(f"fetch_checkpoint tried to download {url}")

        return download

    monkeypatch.setattr(weights, "_downloader", downloader)


def serve(monkeypatch, payload):
    """Replace the network by a downloader that 'receives' ``payload``; returns the call log."""
    calls = []

    def downloader(progress):
        def download(url, output_file, pooch_instance):
            calls.append(url)
            if isinstance(output_file, (str, os.PathLike)):
                Path(output_file).write_bytes(payload)
            else:
                output_file.write(payload)

        return download

    monkeypatch.setattr(weights, "_downloader", downloader)
    return calls


# --- the registry -------------------------------------------------------------------


SAM2 = ("sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large")


def test_registry_holds_the_expected_models():
    assert set(REGISTRY) == {
        "vit_b", "vit_l", "vit_h", "vit_t",
        "vit_b_lm", "vit_l_lm", "vit_t_lm",
        "vit_b_em_organelles", "vit_l_em_organelles", "vit_t_em_organelles",
        *SAM2,
    }  # fmt: skip
    assert [e.name for e in list_models()] == list(REGISTRY)


@pytest.mark.parametrize("entry", list(REGISTRY.values()), ids=list(REGISTRY))
def test_registry_entry_is_well_formed(entry):
    assert entry is REGISTRY[entry.name]
    assert entry.url.startswith("https://")
    assert entry.config in {"vit_b", "vit_l", "vit_h", "vit_t", *SAM2}
    assert entry.name.startswith(entry.config)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}|md5:[0-9a-f]{32}|xxh128:[0-9a-f]{32}", entry.known_hash)
    assert entry.filename == Path(entry.filename).name and entry.filename.endswith((".pt", ".pth"))
    assert entry.description and "\n" not in entry.description
    assert entry.licence in {"Apache-2.0", "CC-BY-4.0"}
    assert entry.homepage.startswith("https://github.com/")


def test_registry_file_names_and_hashes_are_unique():
    entries = list_models()
    assert len({e.filename for e in entries}) == len(entries)
    assert len({e.known_hash for e in entries}) == len(entries)


def test_meta_checkpoints_keep_their_official_file_names():
    for name in ("vit_b", "vit_l", "vit_h"):
        entry = REGISTRY[name]
        assert entry.url.rsplit("/", 1)[1] == entry.filename
        assert entry.hash_algorithm == "sha256"
        assert entry.licence == "Apache-2.0"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"url": "http://example.org/x.pth"}, "https://"),
        ({"config": "vit_g"}, "config"),
        ({"known_hash": "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"}, "algorithm"),
        ({"known_hash": "sha256:abc"}, "64 lower-case hex"),
        ({"known_hash": "sha1:" + "0" * 40}, "algorithm"),
        ({"filename": "../x.pth"}, "bare file name"),
    ],
)
def test_model_entry_rejects_malformed_fields(change, message):
    fields = dict(
        name="x", config="vit_b", url="https://example.org/x.pth", known_hash="md5:" + "0" * 32,
        filename="x.pth", description="d", licence="MIT",
    )  # fmt: skip
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        ModelEntry(**fields)


def test_unknown_name_lists_the_available_ones(cache):
    with pytest.raises(UnknownModelError) as info:
        fetch_checkpoint("vit_z")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    text = str(info.value)
    assert "'vit_z'" in text and "vit_b_lm" in text and "vit_t_em_organelles" in text
    assert not text.startswith('"')  # not KeyError's quoted form
    with pytest.raises(KeyError):
        checkpoint_path("vit_z")


# --- the cache folder ---------------------------------------------------------------


def test_cache_dir_follows_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.CACHE_ENV_VAR, str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    assert checkpoint_path("vit_b") == tmp_path / "elsewhere" / "sam_vit_b_01ec64.pth"
    monkeypatch.delenv(weights.CACHE_ENV_VAR)
    assert cache_dir() == Path(pooch.os_cache("napari-sam"))
    monkeypatch.setenv(weights.CACHE_ENV_VAR, "")  # empty means unset
    assert cache_dir() == Path(pooch.os_cache("napari-sam"))


def test_importing_weights_loads_neither_torch_nor_pooch():
    code = "import sys, napari_sam.weights; print(sorted(m for m in ('torch', 'pooch') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- fetching -----------------------------------------------------------------------


def test_cached_file_with_matching_hash_is_returned_without_network(cache, monkeypatch):
    entry = register(monkeypatch)
    cache.mkdir(parents=True)
    (cache / entry.filename).write_bytes(PAYLOAD)
    forbid_downloads(monkeypatch)
    path = fetch_checkpoint("fake", progress=False)
    assert path == cache / entry.filename
    assert path.read_bytes() == PAYLOAD


def test_download_lands_in_the_cache_and_is_reused(cache, monkeypatch):
    entry = register(monkeypatch)
    calls = serve(monkeypatch, PAYLOAD)
    path = fetch_checkpoint("fake", progress=False)
    assert path == cache / entry.filename and path.read_bytes() == PAYLOAD
    assert calls == [UNREACHABLE]
    assert fetch_checkpoint("fake") == path
    assert calls == [UNREACHABLE]  # the second call found the verified file
    assert sorted(p.name for p in cache.iterdir()) == [entry.filename]  # no temporary left


def test_offline_failure_names_url_file_and_path(cache, monkeypatch):
    entry = register(monkeypatch)
    with pytest.raises(CheckpointDownloadError) as info:
        fetch_checkpoint("fake", progress=False)  # the real downloader, against a refused local port
    assert not isinstance(info.value, ChecksumMismatchError)
    text = str(info.value)
    assert UNREACHABLE in text
    assert entry.filename in text
    assert str(cache / entry.filename) in text
    assert weights.CACHE_ENV_VAR in text
    assert not (cache / entry.filename).exists()


def test_offline_failure_mentions_a_present_file_with_the_wrong_checksum(cache, monkeypatch):
    entry = register(monkeypatch)
    cache.mkdir(parents=True)
    (cache / entry.filename).write_bytes(b"truncated")

    def downloader(progress):
        def refuse(url, output_file, pooch_instance):
            raise ConnectionError("network is unreachable")

        return refuse

    monkeypatch.setattr(weights, "_downloader", downloader)
    with pytest.raises(CheckpointDownloadError, match="checksum does not match") as info:
        fetch_checkpoint("fake", progress=False)
    assert "network is unreachable" in str(info.value)
    assert (cache / entry.filename).read_bytes() == b"truncated"  # left for the user to replace


def test_hash_mismatch_raises_and_keeps_nothing(cache, monkeypatch):
    entry = register(monkeypatch)
    serve(monkeypatch, PAYLOAD + b"tampered")
    with pytest.raises(ChecksumMismatchError) as info:
        fetch_checkpoint("fake", progress=False)
    assert isinstance(info.value, CheckpointDownloadError) and isinstance(info.value, RuntimeError)
    assert UNREACHABLE in str(info.value) and str(cache / entry.filename) in str(info.value)
    assert not (cache / entry.filename).exists()
    assert list(cache.iterdir()) == []


def test_wrong_file_in_cache_is_replaced_by_a_verified_download(cache, monkeypatch):
    entry = register(monkeypatch)
    cache.mkdir(parents=True)
    (cache / entry.filename).write_bytes(b"an older file")
    calls = serve(monkeypatch, PAYLOAD)
    assert fetch_checkpoint("fake", progress=False).read_bytes() == PAYLOAD
    assert len(calls) == 1


def test_xxh128_entries_ask_for_xxhash_when_it_is_missing(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "xxhash", None)  # makes `import xxhash` fail
    forbid_downloads(monkeypatch)
    with pytest.raises(CheckpointDownloadError, match="pip install xxhash") as info:
        fetch_checkpoint("vit_b_lm")
    assert str(checkpoint_path("vit_b_lm")) in str(info.value)


def test_xxh128_cached_file_is_verified_when_xxhash_is_installed(cache, monkeypatch):
    xxhash = pytest.importorskip("xxhash")
    name = "fake_xxh"
    entry = ModelEntry(
        name=name, config="vit_t", url=UNREACHABLE, known_hash="xxh128:" + xxhash.xxh128(PAYLOAD).hexdigest(),
        filename="fake_xxh.pt", description="d", licence="CC-BY-4.0",
    )  # fmt: skip
    monkeypatch.setitem(REGISTRY, name, entry)
    cache.mkdir(parents=True)
    (cache / entry.filename).write_bytes(PAYLOAD)
    forbid_downloads(monkeypatch)
    assert fetch_checkpoint(name).read_bytes() == PAYLOAD


# --- instance decoders as files of their own ----------------------------------------

# micro-sam 1.8.14's registry (micro_sam/util.py, models()): "<name>_decoder" -> address, xxh128
MICRO_SAM_DECODERS = {
    "vit_l_lm": ("idealistic-rat/1.2/files/vit_l_decoder.pt", "2faeafa03819dfe03e7c46a44aaac64a"),
    "vit_b_lm": ("diplomatic-bug/1.2/files/vit_b_decoder.pt", "708b15ac620e235f90bb38612c4929ba"),
    "vit_t_lm": ("faithful-chicken/1.1/files/vit_t_decoder.pt", "3e914a5f397b0312cdd36813031f8823"),
    "vit_l_em_organelles": ("humorous-crab/1.2/files/vit_l_decoder.pt", "334877640bfdaaabce533e3252a17294"),
    "vit_b_em_organelles": ("noisy-ox/1.2/files/vit_b_decoder.pt", "bb6398956a6b0132c26b631c14f95ce2"),
    "vit_t_em_organelles": ("greedy-whale/1/files/vit_t_decoder.pt", "8f897c7bb93174a4d1638827c4dd6f44"),
}


def register_with_decoder(monkeypatch, decoder_payload=PAYLOAD, name="fake_lm"):
    entry = ModelEntry(
        name=name, config="vit_b", url=UNREACHABLE, known_hash="sha256:" + hashlib.sha256(b"sam").hexdigest(),
        filename=f"{name}.pt", description="d", licence="CC-BY-4.0",
        decoder=DecoderFile(UNREACHABLE.replace("fake.pth", "fake_decoder.pt"),
                            "sha256:" + hashlib.sha256(decoder_payload).hexdigest(), f"{name}_decoder.pt"),
    )  # fmt: skip
    monkeypatch.setitem(REGISTRY, name, entry)
    return entry


def test_micro_sam_models_name_their_decoder_files_as_micro_sam_does():
    with_decoder = {e.name for e in list_models() if e.decoder is not None}
    assert with_decoder == set(MICRO_SAM_DECODERS)
    for name, (tail, xxh128) in MICRO_SAM_DECODERS.items():
        entry, decoder = REGISTRY[name], REGISTRY[name].decoder
        assert decoder.url == "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/" + tail
        assert decoder.known_hash == f"xxh128:{xxh128}"
        # beside the SAM weights of the same BioImage.IO model version
        assert decoder.url.rsplit("/", 1)[0] == entry.url.rsplit("/", 1)[0]
        assert decoder.filename == entry.filename.replace(".pt", "_decoder.pt")
    files = [e.filename for e in list_models()] + [e.decoder.filename for e in list_models() if e.decoder]
    hashes = [e.known_hash for e in list_models()] + [e.decoder.known_hash for e in list_models() if e.decoder]
    assert len(set(files)) == len(files) and len(set(hashes)) == len(hashes)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"url": "http://example.org/d.pt"}, "https://"),
        ({"known_hash": "xxh128:abc"}, "32 lower-case hex"),
        ({"known_hash": "crc32:" + "0" * 8}, "algorithm"),
        ({"filename": "sub/d.pt"}, "bare file name"),
    ],
)
def test_decoder_file_rejects_malformed_fields(change, message):
    fields = dict(url="https://example.org/d.pt", known_hash="md5:" + "0" * 32, filename="d.pt")
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        DecoderFile(**fields)


def test_decoder_file_needs_its_own_file_name():
    with pytest.raises(ValueError, match="file name of its own"):
        ModelEntry(name="x", config="vit_b", url="https://example.org/x.pt", known_hash="md5:" + "0" * 32,
                   filename="x.pt", description="d", licence="MIT",
                   decoder=DecoderFile("https://example.org/d.pt", "md5:" + "1" * 32, "x.pt"))


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h", "vit_t", *SAM2])
def test_models_without_a_decoder_file_fetch_nothing(name, cache, monkeypatch):
    forbid_downloads(monkeypatch)
    assert fetch_decoder(name) is None
    assert not cache.exists()


def test_fetch_decoder_refuses_an_unknown_name(cache, monkeypatch):
    forbid_downloads(monkeypatch)
    with pytest.raises(UnknownModelError, match="vit_b_lm"):
        fetch_decoder("vit_x_lm")


def test_decoder_download_lands_in_the_cache_and_only_the_decoder_is_fetched(cache, monkeypatch):
    entry = register_with_decoder(monkeypatch)
    calls = serve(monkeypatch, PAYLOAD)
    path = fetch_decoder("fake_lm", progress=False)
    assert path == cache / entry.decoder.filename and path.read_bytes() == PAYLOAD
    assert calls == [entry.decoder.url]  # the SAM weights were not asked for
    assert fetch_decoder("fake_lm") == path and len(calls) == 1
    assert sorted(p.name for p in cache.iterdir()) == [entry.decoder.filename]


def test_decoder_with_the_wrong_checksum_is_refused_and_not_kept(cache, monkeypatch):
    entry = register_with_decoder(monkeypatch)
    serve(monkeypatch, PAYLOAD + b"tampered")
    with pytest.raises(ChecksumMismatchError, match="instance decoder of model 'fake_lm'") as info:
        fetch_decoder("fake_lm", progress=False)
    assert entry.decoder.url in str(info.value) and str(cache / entry.decoder.filename) in str(info.value)
    assert list(cache.iterdir()) == []


def test_offline_decoder_failure_names_url_file_and_path(cache, monkeypatch):
    entry = register_with_decoder(monkeypatch)
    with pytest.raises(CheckpointDownloadError) as info:
        fetch_decoder("fake_lm", progress=False)  # the real downloader, against a refused local port
    text = str(info.value)
    assert "instance decoder of model 'fake_lm'" in text
    assert entry.decoder.url in text and entry.decoder.filename in text
    assert str(cache / entry.decoder.filename) in text
    assert not (cache / entry.decoder.filename).exists()


def test_registry_decoder_asks_for_xxhash_when_it_is_missing(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "xxhash", None)  # makes `import xxhash` fail
    forbid_downloads(monkeypatch)
    with pytest.raises(CheckpointDownloadError, match="pip install xxhash") as info:
        fetch_decoder("vit_b_em_organelles")
    assert REGISTRY["vit_b_em_organelles"].decoder.filename in str(info.value)


def test_a_fetched_decoder_file_loads_as_the_instance_decoder(cache, monkeypatch):
    torch = pytest.importorskip("torch")
    from napari_sam.model.decoder_checkpoint import load_instance_decoder
    from napari_sam.model.instance_decoder import InstanceDecoder, InstanceDecoderConfig

    original = InstanceDecoder(InstanceDecoderConfig(initial_features=4, transposed=True))
    buffer = cache.parent / "decoder_bytes.pt"
    torch.save(original.state_dict(), buffer)  # micro-sam's decoder files: the state dict alone
    register_with_decoder(monkeypatch, decoder_payload=buffer.read_bytes())
    serve(monkeypatch, buffer.read_bytes())
    loaded = load_instance_decoder(fetch_decoder("fake_lm", progress=False))
    assert loaded.config == original.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in original.state_dict().items())


# --- SAM 2.1: a family of its own ----------------------------------------------------

# Meta's SAM 2.1 checkpoints (092824 release): sha256 and size as micro-sam pins them
# (micro_sam/v2/util.py, HASHES), matching Hugging Face's LFS pointers of facebook/sam2.1-hiera-*.
SAM2_FILES = {
    "sam2.1_hiera_tiny": ("7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", 156_008_466),
    "sam2.1_hiera_small": ("6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38", 184_416_285),
    "sam2.1_hiera_base_plus": ("a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5", 323_606_802),
    "sam2.1_hiera_large": ("2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", 898_083_611),
}


def test_sam2_checkpoints_are_meta_s_files_with_pinned_checksums():
    assert [e.name for e in list_models("sam2")] == list(SAM2_FILES)
    for name, (sha256, size) in SAM2_FILES.items():
        entry = REGISTRY[name]
        assert entry.family == "sam2" and entry.config == name
        assert entry.url == f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/{name}.pt"
        assert entry.filename == f"{name}.pt" == entry.url.rsplit("/", 1)[1]
        assert entry.known_hash == f"sha256:{sha256}" and entry.size_bytes == size
        assert entry.licence == "Apache-2.0" and entry.homepage == "https://github.com/facebookresearch/sam2"
        assert entry.description.startswith("SAM 2.1 Hiera-") and "propagation" in entry.description
        assert entry.decoder is None


def test_families_split_the_registry():
    sam, sam2 = list_models("sam"), list_models("sam2")
    assert {e.name for e in sam} | {e.name for e in sam2} == set(REGISTRY)
    assert not {e.name for e in sam} & {e.name for e in sam2}
    assert all(e.config in weights.FAMILIES["sam"] for e in sam)
    assert {e.config for e in sam2} == weights.FAMILIES["sam2"] == set(SAM2)
    assert weights.ENCODERS == weights.FAMILIES["sam"] | weights.FAMILIES["sam2"]
    assert weights.family_of("vit_t") == "sam" and weights.family_of("sam2.1_hiera_large") == "sam2"
    with pytest.raises(ValueError, match="'hiera_t' is not one of"):
        weights.family_of("hiera_t")
    with pytest.raises(ValueError, match="unknown model family 'sam3'"):
        list_models("sam3")


def test_sam2_family_names_are_the_model_configurations():
    pytest.importorskip("torch")
    from napari_sam.model.sam2 import CONFIGS

    assert set(CONFIGS) == weights.FAMILIES["sam2"]


def test_a_sam2_entry_cannot_carry_an_instance_decoder():
    with pytest.raises(ValueError, match="only SAM checkpoints have an instance decoder"):
        ModelEntry(name="sam2.1_hiera_tiny_x", config="sam2.1_hiera_tiny", url="https://example.org/x.pt",
                   known_hash="md5:" + "0" * 32, filename="x.pt", description="d", licence="MIT",
                   decoder=DecoderFile("https://example.org/d.pt", "md5:" + "1" * 32, "d.pt"))


def test_the_real_sam2_entry_asks_its_address_and_refuses_other_bytes(cache, monkeypatch):
    calls = serve(monkeypatch, PAYLOAD)  # the network answers with bytes that are not the checkpoint
    entry = REGISTRY["sam2.1_hiera_tiny"]
    with pytest.raises(ChecksumMismatchError) as info:
        fetch_checkpoint("sam2.1_hiera_tiny", progress=False)
    assert calls == [entry.url]
    assert str(cache / "sam2.1_hiera_tiny.pt") in str(info.value) and SAM2_FILES[entry.name][0] in str(info.value)
    assert list(cache.iterdir()) == []


def test_a_sam2_checkpoint_downloads_into_the_cache_under_its_official_name(cache, monkeypatch):
    import dataclasses

    entry = dataclasses.replace(REGISTRY["sam2.1_hiera_small"],
                                known_hash="sha256:" + hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    calls = serve(monkeypatch, PAYLOAD)
    path = fetch_checkpoint("sam2.1_hiera_small", progress=False)
    assert path == cache / "sam2.1_hiera_small.pt" and path.read_bytes() == PAYLOAD
    assert calls == ["https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_small.pt"]
    assert fetch_decoder("sam2.1_hiera_small") is None and len(calls) == 1


def test_cli_lists_and_downloads_sam2_checkpoints(cache, monkeypatch, capsys):
    import dataclasses

    from napari_sam.cli import main

    assert main(["models"]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name in SAM2_FILES:
        assert listed[name].split(None, 1)[1] == REGISTRY[name].description
    entry = dataclasses.replace(REGISTRY["sam2.1_hiera_tiny"],
                                known_hash="sha256:" + hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    calls = serve(monkeypatch, PAYLOAD)
    assert main(["download", "sam2.1_hiera_tiny"]) == 0
    assert capsys.readouterr().out.split() == [str(cache / "sam2.1_hiera_tiny.pt")]
    assert calls == [entry.url] and (cache / "sam2.1_hiera_tiny.pt").read_bytes() == PAYLOAD
