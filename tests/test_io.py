"""Saving and loading concepts: safetensors only, checked on load, never unpickled."""

from __future__ import annotations

import copy
import json
import os
import pickle
import stat
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from captum_nmf import NMFConceptAttribution, __version__
from captum_nmf.exceptions import (
    ConceptModelFormatError,
    ConceptModelMismatchError,
    LayerNameMismatchWarning,
    ModelMismatchWarning,
)
from captum_nmf.io import (
    FORMAT_NAME,
    atomic_write,
    content_digest,
    default_file_mode,
    load_tensors,
    save_tensors,
)
from tests.helpers.basic_models import PlantedConceptNet, SignedNet, planted_maps


@pytest.fixture
def fitted() -> tuple[PlantedConceptNet, NMFConceptAttribution]:
    net = PlantedConceptNet()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=7)
    return net, attr.fit(planted_maps(4, 6, 6), progress=False)


def test_round_trip_gives_identical_maps_and_metadata(
    tmp_path: Path, fitted: tuple[PlantedConceptNet, NMFConceptAttribution]
) -> None:
    net, attr = fitted
    path = attr.save(tmp_path / "concepts.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concepts.safetensors"]  # no temp left
    loaded = NMFConceptAttribution.load(path, net, net.relu)
    x = planted_maps(2, 5, 5, seed=3)
    assert torch.equal(loaded.concepts_, attr.concepts_)
    assert torch.equal(loaded.attribute(x), attr.attribute(x))
    assert loaded.layer_name_ == "relu"
    assert loaded.n_channels_in_ == 5
    assert loaded.random_state == 7
    assert loaded.negative == "raise"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["concepts"]
    assert meta["format"] == FORMAT_NAME
    assert meta["format_version"] == "1"
    assert meta["captum_nmf_version"] == __version__
    assert meta["n_concepts"] == "3"
    assert meta["n_channels"] == "5"
    assert meta["layer_name"] == "relu"
    assert json.loads(meta["solver"])["init"] == "nndsvda"


def test_negative_policy_round_trips(tmp_path: Path) -> None:
    net = SignedNet()
    x = torch.rand(2, 2, 3, 3)
    attr = NMFConceptAttribution(net, net.conv, n_concepts=2, negative="relu", random_state=0)
    path = attr.fit(x, progress=False).save(tmp_path / "c.safetensors")
    loaded = NMFConceptAttribution.load(path, net, net.conv)
    assert loaded.negative == "relu"
    assert torch.equal(loaded.attribute(x), attr.attribute(x))


def test_load_onto_layer_with_other_channel_count(
    tmp_path: Path, fitted: tuple[PlantedConceptNet, NMFConceptAttribution]
) -> None:
    _, attr = fitted
    path = attr.save(tmp_path / "c.safetensors")
    other = PlantedConceptNet(torch.rand(3, 4))
    # Statically known channel count (a convolution): refused at load.
    with pytest.raises(ConceptModelMismatchError, match="expects 5 channels from 'relu'.*has 4"):
        NMFConceptAttribution.load(path, other, other.conv)
    # A ReLU declares no channel count: refused at the first attribute.
    with pytest.warns(ModelMismatchWarning, match="other weights"):  # another network, too
        loaded = NMFConceptAttribution.load(path, other, other.relu)
    with pytest.raises(ConceptModelMismatchError, match="expect 5 channels.*produced 4"):
        loaded.attribute(planted_maps(1, 3, 3))


def test_concepts_loaded_onto_another_network_warn_or_raise(
    tmp_path: Path, fitted: tuple[PlantedConceptNet, NMFConceptAttribution]
) -> None:
    """Before: nothing tied concepts to the network they were fitted on; the command line's
    random torchvision networks and other --weights gave other maps without a word."""
    net, attr = fitted
    assert set(attr.provenance_) == {"weights_sha256"}
    path = attr.save(tmp_path / "c.safetensors")
    with warnings.catch_warnings():  # the same network (any copy of it): nothing to say
        warnings.simplefilter("error")
        same = NMFConceptAttribution.load(path, net, net.relu)
        twin = copy.deepcopy(net)
        NMFConceptAttribution.load(path, lambda x: twin(x).softmax(1), twin.relu)
    assert same.provenance_ == attr.provenance_
    wide = copy.deepcopy(net).to(torch.float64)  # the same weights in another float width
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NMFConceptAttribution.load(path, wide, wide.relu)
    with torch.no_grad():
        twin.conv.weight.mul_(1.01)  # fine-tuned, re-trained, or other --weights
    with pytest.warns(ModelMismatchWarning, match=r"Could not confirm .* weights differ"):
        NMFConceptAttribution.load(path, twin, twin.relu)
    with pytest.raises(ConceptModelMismatchError, match=r"weights differ.*strict=True refuses"):
        NMFConceptAttribution.load(path, twin, twin.relu, strict=True)
    tensors, meta = load_tensors(path, required=("concepts",))
    del meta["provenance"]  # a file written before the record: not checked
    meta.pop("content_sha256", None)
    meta.pop("integrity", None)
    save_tensors(tmp_path / "old.safetensors", tensors, meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = NMFConceptAttribution.load(tmp_path / "old.safetensors", twin, twin.relu)
    assert old.provenance_ == {}


def test_a_model_whose_state_is_not_only_tensors_still_fits() -> None:
    """The weights record skips what it cannot read: extra state made fit() fail."""

    class WithExtraState(PlantedConceptNet):
        def get_extra_state(self) -> dict[str, int]:
            return {"version": 2}

        def set_extra_state(self, state: object) -> None:
            pass

    net = WithExtraState()
    attr = NMFConceptAttribution(net, net.relu, 3, random_state=0).fit(
        planted_maps(4, 6, 6), progress=False
    )
    assert len(attr.provenance_["weights_sha256"]) == 64


def test_layer_name_mismatch_warns_or_raises(
    tmp_path: Path, fitted: tuple[PlantedConceptNet, NMFConceptAttribution]
) -> None:
    net, attr = fitted
    path = attr.save(tmp_path / "c.safetensors")
    with pytest.warns(LayerNameMismatchWarning, match="fitted on layer 'relu'.*'conv'"):
        NMFConceptAttribution.load(path, net, net.conv)
    with pytest.raises(ConceptModelMismatchError, match="strict=False"):
        NMFConceptAttribution.load(path, net, net.conv, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NMFConceptAttribution.load(path, net, net.relu)


class _Evil:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


@pytest.mark.parametrize("suffix", [".pt", ".pkl", ".safetensors"])
def test_pickle_is_refused_and_never_runs(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / f"evil{suffix}"
    evil.write_bytes(pickle.dumps(_Evil(marker)))
    net = PlantedConceptNet()
    with pytest.raises(ConceptModelFormatError, match="refusing to unpickle"):
        NMFConceptAttribution.load(evil, net, net.relu)
    assert not marker.exists()


def test_torch_save_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "concepts.safetensors"
    torch.save({"concepts": torch.ones(2, 5)}, path)
    net = PlantedConceptNet()
    with pytest.raises(ConceptModelFormatError, match="refusing to unpickle"):
        NMFConceptAttribution.load(path, net, net.relu)


def test_corrupt_and_foreign_files(
    tmp_path: Path, fitted: tuple[PlantedConceptNet, NMFConceptAttribution]
) -> None:
    net, attr = fitted
    good = attr.save(tmp_path / "good.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[:20])
    with pytest.raises(ConceptModelFormatError, match="not a valid .safetensors") as info:
        NMFConceptAttribution.load(truncated, net, net.relu)
    assert info.value.__cause__ is not None
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("123")
    with pytest.raises(ConceptModelFormatError, match="not a valid .safetensors"):
        NMFConceptAttribution.load(garbage, net, net.relu)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.ones(2)}, str(foreign))
    with pytest.raises(ConceptModelFormatError, match="not a captum-nmf/concepts file"):
        NMFConceptAttribution.load(foreign, net, net.relu)
    with pytest.raises(FileNotFoundError, match="Concept model file not found"):
        NMFConceptAttribution.load(tmp_path / "missing.safetensors", net, net.relu)


def _rewrite(path: Path, *, redigest: bool = True, **changes: str) -> None:
    """Edit a file's metadata; with ``redigest`` its content digest is updated too."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.update(changes)
    if redigest:
        meta["content_sha256"] = content_digest(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format_version": "999"}, "format 999.*Upgrade captum-nmf"),
        ({"format_version": "one"}, "unreadable format_version"),
        ({"n_channels": "6"}, "metadata says 3 x 6"),
        ({"solver": "{not json"}, "unreadable metadata .solver."),
        ({"negative": "shift"}, "invalid settings"),
    ],
)
def test_bad_metadata(
    tmp_path: Path,
    fitted: tuple[PlantedConceptNet, NMFConceptAttribution],
    changes: dict[str, str],
    match: str,
) -> None:
    net, attr = fitted
    path = attr.save(tmp_path / "c.safetensors")
    _rewrite(path, **changes)
    with pytest.raises(ConceptModelFormatError, match=match):
        NMFConceptAttribution.load(path, net, net.relu)


def test_save_needs_safetensors_suffix_and_string_metadata(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="saves .safetensors files.*'c.safetensors'"):
        save_tensors(tmp_path / "c.pt", {"concepts": torch.ones(1, 1)}, {})
    with pytest.raises(TypeError, match="metadata\\['k'\\] must be a str"):
        save_tensors(tmp_path / "c.safetensors", {"concepts": torch.ones(1, 1)}, {"k": 1})  # type: ignore[dict-item]
    tensors, meta = load_tensors(
        save_tensors(tmp_path / "d" / "c.safetensors", {"concepts": torch.ones(1, 1)}, {"a": "b"}),
        required=("concepts",),
    )
    assert meta["a"] == "b"
    assert torch.equal(tensors["concepts"], torch.ones(1, 1))
    with pytest.raises(ConceptModelFormatError, match="lacks the tensor"):
        load_tensors(tmp_path / "d" / "c.safetensors", required=("other",))


# ------------------------------------------------------------------ integrity
def _flip(path: Path, offset_from_end: int, n: int = 64) -> None:
    """Flip ``n`` bytes of ``path``'s tensor data, ``offset_from_end`` bytes before its end."""
    data = bytearray(path.read_bytes())
    start = len(data) - offset_from_end
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_tensor_bytes_are_refused(
    tmp_path: Path, fitted: tuple[PlantedConceptNet, NMFConceptAttribution]
) -> None:
    net, attr = fitted
    path = attr.save(tmp_path / "c.safetensors")
    _flip(path, 40, n=8)  # inside the concepts tensor: safetensors itself cannot notice
    with pytest.raises(ConceptModelFormatError, match="c.safetensors is corrupt: its SHA-256"):
        NMFConceptAttribution.load(path, net, net.relu)


def test_edited_metadata_without_a_new_digest_is_refused(
    tmp_path: Path, fitted: tuple[PlantedConceptNet, NMFConceptAttribution]
) -> None:
    net, attr = fitted
    path = attr.save(tmp_path / "c.safetensors")
    _rewrite(path, redigest=False, layer_name="other")
    with pytest.raises(ConceptModelFormatError, match="is corrupt"):
        NMFConceptAttribution.load(path, net, net.relu)


def test_file_without_a_digest_still_loads(
    tmp_path: Path, fitted: tuple[PlantedConceptNet, NMFConceptAttribution]
) -> None:
    """Files written before the digest existed load as before."""
    net, attr = fitted
    path = attr.save(tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("content_sha256", "integrity")}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata=meta)
    again = NMFConceptAttribution.load(path, net, net.relu)
    assert torch.equal(again.concepts_, attr.concepts_)


def test_content_digest_depends_on_values_names_and_metadata() -> None:
    t = {"a": torch.arange(4.0)}
    base = content_digest(t, {"k": "v"})
    assert base == content_digest({"a": torch.arange(4.0)}, {"k": "v", "content_sha256": "x"})
    assert base != content_digest({"a": torch.arange(4.0) + 1}, {"k": "v"})
    assert base != content_digest({"b": torch.arange(4.0)}, {"k": "v"})
    assert base != content_digest(t, {"k": "w"})
    assert base != content_digest({"a": torch.arange(4.0).double()}, {"k": "v"})


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        assert default_file_mode() == 0o666 & ~umask
        path = save_tensors(tmp_path / "c.safetensors", {"concepts": torch.ones(1, 1)}, {})
        with atomic_write(tmp_path / "a.json") as fh:
            fh.write("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask


def test_atomic_write_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old", encoding="utf-8")

    def fill_disk() -> None:
        with atomic_write(target) as fh:
            fh.write("partial")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        fill_disk()
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"), atomic_write(target, "a"):
        pass


def test_a_header_length_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path: Path) -> None:
    """A safetensors header of 128 + 256 k bytes makes the file's first byte 0x80."""
    for pad in range(600):
        path = save_tensors(
            tmp_path / "c.safetensors", {"a": torch.zeros(2)}, {"pad": "x" * pad}, format_name="t"
        )
        if path.read_bytes()[0] == 0x80:
            break
    else:  # pragma: no cover - the header grows one byte per pad character
        pytest.fail("no header length with first byte 0x80 was produced")
    tensors, _ = load_tensors(path, format_name="t")
    assert torch.equal(tensors["a"], torch.zeros(2))
    # a real pickle with the .safetensors suffix is still refused
    fake = tmp_path / "p.safetensors"
    fake.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(ConceptModelFormatError, match="refusing to unpickle"):
        load_tensors(fake, format_name="t")


def test_a_write_through_a_symbolic_link_replaces_its_target_and_keeps_the_link(
    tmp_path: Path, fitted: tuple[PlantedConceptNet, NMFConceptAttribution]
) -> None:
    from captum_nmf._core.names import rename_concept_file

    net, attr = fitted
    (tmp_path / "models").mkdir()
    target = attr.save(tmp_path / "models" / "v3.safetensors")
    link = tmp_path / "current.safetensors"
    link.symlink_to(Path("models") / "v3.safetensors")  # relative, as ln -s makes it
    rename_concept_file(link, {0: "stroma"})
    assert link.is_symlink()
    assert os.readlink(link) == str(Path("models") / "v3.safetensors")
    loaded = NMFConceptAttribution.load(target, net, net.relu)
    assert loaded.concept_names[0] == "stroma"  # the file the link points to was renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.safetensors", "models"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["v3.safetensors"]


def test_two_threads_saving_one_file_never_share_a_temporary(tmp_path: Path) -> None:
    """Both used ``.{name}.{pid}.tmp``: 185 of 400 saves failed naming it, and readers saw
    torn files. Each save now has a temporary of its own, created exclusively."""
    import threading

    target = tmp_path / "concepts.safetensors"
    payloads = {n: {"h": torch.full((64, 256), float(n))} for n in range(2)}
    errors: list[BaseException] = []
    seen: list[float] = []

    def save(n: int) -> None:
        for _ in range(100):
            try:
                save_tensors(target, payloads[n], {"writer": str(n)})
            except BaseException as exc:  # collected for the assertion
                errors.append(exc)

    def read() -> None:
        for _ in range(200):
            if not target.exists():
                continue
            try:
                tensors, meta = load_tensors(target)
            except BaseException as exc:  # a torn file would land here
                errors.append(exc)
                continue
            if float(tensors["h"].unique()) != float(meta["writer"]):
                errors.append(AssertionError("a file of one writer's metadata, another's data"))
            seen.append(float(meta["writer"]))

    save_tensors(target, payloads[0], {"writer": "0"})  # the reader has a file from the start
    threads = [threading.Thread(target=save, args=(n,)) for n in range(2)]
    threads.append(threading.Thread(target=read))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert seen  # the reader ran beside the writers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concepts.safetensors"]


def test_a_damaged_digest_key_is_refused(tmp_path: Path) -> None:
    """One flipped bit in the digest's key name made the file pass for one written before
    digests existed: its check was skipped (93 of 4,544 single flips accepted)."""
    path = save_tensors(tmp_path / "c.safetensors", {"h": torch.rand(3, 4)}, {"note": "x"})
    data = bytearray(path.read_bytes())
    at = data.index(b'"content_sha256":"') + 2  # the key's 'o', not the integrity value
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ConceptModelFormatError, match="written with a content digest"):
        load_tensors(path)
    # a file without either key (written before digests) still loads
    plain = tmp_path / "old.safetensors"
    save_file(
        {"h": torch.rand(3, 4)}, str(plain), metadata={"format": FORMAT_NAME, "format_version": "1"}
    )
    assert load_tensors(plain)[1]["format_version"] == "1"
