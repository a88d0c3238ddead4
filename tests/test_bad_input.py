"""Bad input through the command line: tampered checkpoints, bundles and model folders built from a real stories260k
checkpoint, each run through `vqmobile` (vqmobile.cli.main, in this process). Every case must give a non-zero exit,
exactly one line on stderr (file descriptor 2, so native libraries' output counts too) saying what is wrong, no
traceback, and leave nothing behind. Then a bounded fuzz test of the checkpoint and bundle loaders (hypothesis).

The C kernels' own defence against out-of-range indices (a .pte run directly, without these loaders) is
vqm_vq_validate, tested in tests/test_native_c.py (native/README.md, "Safety").
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file, save_file

from conftest import STORIES
from vqmobile.cli import main
from vqmobile.errors import UserError
from vqmobile.hashing import sha256_file

CK_FILES = ("quantized.safetensors", "model.safetensors")


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    """A real GPTVQ checkpoint of stories260k, with k=48 centroids on 6-bit indices, so that an index can be out of
    range (with k a power of two, every bit pattern is a valid index)."""
    out = tmp_path_factory.mktemp("bad-input") / "ck"
    rc = main(["--quiet", "quantize", str(STORIES), "--method", "gptvq", "--vq-dim", "2", "--vq-k", "48",
               "--vq-rows", "16", "--vq-cols", "64", "--em-iters", "5", "--nsamples", "4", "--seqlen", "128",
               "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def bundle(ck, tmp_path_factory) -> Path:
    """The checkpoint exported for this machine, ExecuTorch only (the .pte and kernel-library cases need it)."""
    from vqmobile.export import export_bundle
    from vqmobile.export.runtime.build import host_target

    out = tmp_path_factory.mktemp("bad-input-bundle") / "b"
    export_bundle(str(ck), str(out), target=host_target(), formats=["executorch"], max_seq=64, progress=None)
    return out


# ----------------------------------------------------------------------------------------------------- helpers
def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _fails(capfd, root: Path, argv: list, message: str, out: Path | None = None) -> str:
    """Run the CLI; assert the failure contract (and that `message` is in the error line); return the line."""
    capfd.readouterr()
    before = _tree(root)
    rc = main([str(a) for a in argv])
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert rc != 0, argv
    assert len(lines) == 1 and lines[0].startswith("vqmobile: error: "), err
    assert "Traceback" not in err
    assert message in lines[0], lines[0]
    assert ".tmp-" not in lines[0], lines[0]  # names the user's own input, never our temporary copy
    if out is not None:
        assert not out.exists()
    assert _tree(root) == before, "a failed run left something behind"
    return lines[0]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rehash(ck: Path) -> None:
    """Make the manifest's sha256 agree with tampered files, so the check under test is the one after the hashes
    (a tool that rewrote the files, or someone who meant to get past the hashes)."""
    m = json.loads((ck / "vqmobile.json").read_text())
    m["sha256"] = {f: sha256_file(ck / f) for f in m["sha256"]}
    (ck / "vqmobile.json").write_text(json.dumps(m))


def _edit_manifest(ck: Path, edit) -> None:
    m = json.loads((ck / "vqmobile.json").read_text())
    edit(m)
    (ck / "vqmobile.json").write_text(json.dumps(m))


def _edit_tensors(ck: Path, file: str, edit) -> None:
    tensors = load_file(str(ck / file))
    edit(tensors)
    save_file(tensors, str(ck / file), metadata={"format": "vqmobile" if file == "quantized.safetensors" else "pt"})
    _rehash(ck)


def _vq_layer(ck: Path) -> str:
    layers = json.loads((ck / "vqmobile.json").read_text())["layers"]
    return next(name for name, e in layers.items() if e["kind"] == "vq")


def _header_larger_than_data(f: Path) -> None:
    data = f.read_bytes()  # the first 8 bytes are the header's length
    f.write_bytes(struct.pack("<Q", len(data) + 4096) + data[8:])


def _eval(path: Path) -> list:
    return ["eval", path, "--windows", "1"]


# -------------------------------------------------------------------------------------------------- checkpoints
def test_index_out_of_range(ck, tmp_path, capfd):
    bad = _copy(ck, tmp_path / "ck")
    layer = _vq_layer(bad)

    def flip(t):  # every bit of the first row's first index byte set: index 63 >= k = 48
        t[f"{layer}.indices"][0, 0] = 0xFF

    _edit_tensors(bad, "quantized.safetensors", flip)
    line = _fails(capfd, tmp_path, _eval(bad), "out of range for a codebook of 48 entries")
    assert f"checkpoint {bad}" in line and f"layer {layer}" in line and "quantize the model again" in line


def test_truncated_tensor_file(ck, tmp_path, capfd):
    bad = _copy(ck, tmp_path / "ck")
    data = (bad / "quantized.safetensors").read_bytes()
    (bad / "quantized.safetensors").write_bytes(data[: len(data) // 2])
    _fails(capfd, tmp_path, _eval(bad), "quantized.safetensors does not match the manifest's sha256")
    _rehash(bad)
    _fails(capfd, tmp_path, _eval(bad), "quantized.safetensors is not a readable safetensors file")


def test_safetensors_header_larger_than_the_data(ck, tmp_path, capfd):
    bad = _copy(ck, tmp_path / "ck")
    _header_larger_than_data(bad / "model.safetensors")
    _rehash(bad)
    _fails(capfd, tmp_path, _eval(bad), "model.safetensors is not a readable safetensors file")


def test_manifest_lies_about_a_shape(ck, tmp_path, capfd):
    bad = _copy(ck, tmp_path / "ck")
    layer = _vq_layer(bad)
    _edit_manifest(bad, lambda m: m["layers"][layer]["spec"].update(shape=[64, 96]))
    line = _fails(capfd, tmp_path, _eval(bad), "tensor 'indices' is torch.uint8")
    assert f"checkpoint {bad}: layer {layer}:" in line and "the manifest implies" in line
    assert "quantize the model again" in line


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("layers"), "has no valid 'layers' entry"),
    (lambda m: m.pop("sha256"), "has no sha256"),
    (lambda m: m.update(format_version="1"), "format version '1'"),
    (lambda m: m.update(bits_per_weight="3.1"), "has no valid 'bits_per_weight' entry"),
    (lambda m: next(iter(m["layers"].values()))["spec"].pop("k"), "vq weight spec is malformed"),
    (lambda m: next(iter(m["layers"].values())).update(spec=[1, 2]), "has no valid 'kind' and 'spec'"),
    (lambda m: m["sha256"].update({"../../etc/passwd": "0" * 64}), "outside the checkpoint folder"),
], ids=["no-layers", "no-sha256", "version-type", "bpw-type", "spec-missing-key", "spec-type", "path-escape"])
def test_manifest_fields_wrong_or_missing(ck, tmp_path, capfd, edit, message):
    bad = _copy(ck, tmp_path / "ck")
    _edit_manifest(bad, edit)
    _fails(capfd, tmp_path, _eval(bad), message)


def test_unknown_method(ck, tmp_path, capfd):
    bad = _copy(ck, tmp_path / "ck")

    def edit(m):
        m["method"] = "quip-e8"
        for e in m["layers"].values():
            e["kind"] = "quip-e8"

    _edit_manifest(bad, edit)
    _fails(capfd, tmp_path, _eval(bad), "unknown quantized weight kind 'quip-e8'")


def test_manifest_not_json(ck, tmp_path, capfd):
    bad = _copy(ck, tmp_path / "ck")
    (bad / "vqmobile.json").write_text('{"format_version": 1, "layers": {')
    _fails(capfd, tmp_path, _eval(bad), "cannot read vqmobile.json")


@pytest.mark.parametrize("where", ["codebook", "embedding"])
def test_nan_scale(ck, tmp_path, capfd, where):
    bad = _copy(ck, tmp_path / "ck")
    key = f"{_vq_layer(bad)}.codebook_scale" if where == "codebook" else "model.embed_tokens.scales"

    def poison(t):
        t[key] = t[key].clone()
        t[key].view(-1)[0] = float("nan")

    _edit_tensors(bad, "quantized.safetensors", poison)
    _fails(capfd, tmp_path, _eval(bad), "non-finite")


def test_config_that_does_not_fit_the_tensors(ck, tmp_path, capfd):
    bad = _copy(ck, tmp_path / "ck")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_size": 1 << 20, "vocab_size": 1 << 24}))
    _fails(capfd, tmp_path, _eval(bad), "config.json does not match the manifest's sha256")
    _rehash(bad)  # past the hash, it must still fail before allocating a model of 2^44 embedding weights
    _fails(capfd, tmp_path, _eval(bad), "config.json implies")
    (bad / "config.json").write_text("{")
    _rehash(bad)
    _fails(capfd, tmp_path, _eval(bad), "cannot read config.json")


def test_broken_tokenizer(ck, tmp_path, capfd):
    bad = _copy(ck, tmp_path / "ck")
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"}}')
    _rehash(bad)
    _fails(capfd, tmp_path, _eval(bad), "cannot load its tokenizer")


def test_failed_export_leaves_no_folders(ck, tmp_path, capfd):
    """The issue's case: a truncated checkpoint exported to OUT/a/b/out with OUT absent."""
    bad = _copy(ck, tmp_path / "ck")
    data = (bad / "quantized.safetensors").read_bytes()
    (bad / "quantized.safetensors").write_bytes(data[:-100])
    out = tmp_path / "OUT" / "a" / "b" / "out"
    line = _fails(capfd, tmp_path, ["--quiet", "export", bad, "--target", "x86_64", "--format", "onnx", "--out", out],
                  "does not match the manifest's sha256", out=out)
    assert f"checkpoint {bad}:" in line
    assert not (tmp_path / "OUT").exists()


# ----------------------------------------------------------------------------------------------- model folders
def test_pickle_only_model_is_never_unpickled(tmp_path, capfd):
    model = tmp_path / "pickled"
    model.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(STORIES / f, model / f)
    canary = tmp_path / "unpickled"

    class Payload:  # what a malicious pytorch_model.bin does when unpickled: here, create the canary folder
        def __reduce__(self):
            return os.mkdir, (str(canary),)

    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    out = tmp_path / "OUT" / "a" / "ck"
    _fails(capfd, tmp_path, ["quantize", model, "--method", "rtn", "--group", "32", "--out", out],
           "pickle checkpoints are not loaded", out=out)
    _fails(capfd, tmp_path, _eval(model), "pickle checkpoints are not loaded")
    assert not canary.exists()


def test_model_safetensors_header_larger_than_the_data(tmp_path, capfd):
    model = _copy(STORIES, tmp_path / "model")
    _header_larger_than_data(model / "model.safetensors")
    _fails(capfd, tmp_path, _eval(model), "corrupt or truncated safetensors file")


def test_nested_outputs_of_failed_runs(tmp_path, capfd):
    _fails(capfd, tmp_path, ["eval", tmp_path / "missing", "--json", tmp_path / "J" / "a" / "e.json"],
           "does not exist")
    _fails(capfd, tmp_path, ["quantize", STORIES, "--method", "rtn", "--bits", "9", "--out",
                             tmp_path / "Q" / "a" / "ck"], "--bits 9 is out of range")
    assert _tree(tmp_path) == []


# ------------------------------------------------------------------------------------------------------ bundles
def test_bundle_file_modified(bundle, tmp_path, capfd):
    bad = _copy(bundle, tmp_path / "b")
    data = bytearray((bad / "model.pte").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / "model.pte").write_bytes(bytes(data))
    _fails(capfd, tmp_path, ["check", bad, "--windows", "1"], "model.pte does not match the manifest's sha256")


def test_bundle_missing_pte_or_library(bundle, tmp_path, capfd):
    bad = _copy(bundle, tmp_path / "b")
    (bad / "model.pte").unlink()
    _fails(capfd, tmp_path, ["generate", bad, "--prompt", "Once"], "model.pte is missing")
    bad = _copy(bundle, tmp_path / "b2")
    shutil.rmtree(bad / "lib")
    _fails(capfd, tmp_path, ["generate", bad, "--prompt", "Once"], "missing its kernel library")


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["files"].update({"../../etc/hostname": {"bytes": 1, "sha256": "0"}}), "outside the bundle"),
    (lambda m: m.update(library={"path": "/etc/hostname"}), "no valid 'library' entry"),
    (lambda m: m.update(formats=["tflite"]), "no valid 'formats' entry"),
    (lambda m: m.update(max_seq="64"), "no valid 'max_seq' entry"),
    (lambda m: m.pop("files"), "lists no files"),
], ids=["path-escape", "library-outside", "unknown-format", "max-seq-type", "no-files"])
def test_bundle_manifest_tampered(bundle, tmp_path, capfd, edit, message):
    bad = _copy(bundle, tmp_path / "b")
    m = json.loads((bad / "bundle.json").read_text())
    edit(m)
    (bad / "bundle.json").write_text(json.dumps(m))
    _fails(capfd, tmp_path, ["check", bad, "--windows", "1"], message)


def test_bundle_checkpoint_index_out_of_range(bundle, tmp_path, capfd):
    """Past both layers of hashes (the bundle's and its checkpoint's), the index range check still holds."""
    bad = _copy(bundle, tmp_path / "b")
    inner = bad / "checkpoint"
    layer = _vq_layer(inner)
    _edit_tensors(inner, "quantized.safetensors", lambda t: t[f"{layer}.indices"].__setitem__((0, 0), 0xFF))
    m = json.loads((bad / "bundle.json").read_text())
    for rel in m["files"]:
        if rel.startswith("checkpoint/"):
            m["files"][rel] = {"bytes": (bad / rel).stat().st_size, "sha256": sha256_file(bad / rel)}
    (bad / "bundle.json").write_text(json.dumps(m))
    line = _fails(capfd, tmp_path, ["check", bad, "--windows", "1"], "out of range for a codebook of 48 entries")
    assert f"checkpoint {inner}: layer {layer}:" in line


def test_bundle_that_is_not_one(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    _fails(capfd, tmp_path, ["check", tmp_path / "empty"], "is not a vqmobile bundle")
    _fails(capfd, tmp_path, ["generate", tmp_path / "nope", "--prompt", "x"], "does not exist")


# ---------------------------------------------------------------------------------------------------- fuzzing
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=3), max_leaves=6)
_FUZZ = settings(max_examples=100, deadline=None, database=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _paths(node, prefix=()):
    """Every (container path, key) in a JSON document."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _mutate(doc, data) -> None:
    """Replace one value anywhere in the document with random JSON, or delete it."""
    paths = list(_paths(doc))
    path = data.draw(st.sampled_from(paths))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(_JSON)


def _load_or_user_error(load, *args) -> None:
    """The contract: a loader either succeeds or raises a one-line UserError; anything else is a bug."""
    try:
        load(*args)
    except UserError as e:
        assert str(e) and "Traceback" not in str(e)


@_FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_loader(ck, tmp_path_factory, data):
    from vqmobile.checkpoint import load

    bad = _copy(ck, tmp_path_factory.mktemp("fuzz") / "ck")
    if data.draw(st.booleans()):
        m = json.loads((bad / "vqmobile.json").read_text())
        _mutate(m, data)
        (bad / "vqmobile.json").write_text(json.dumps(m))
    else:  # bytes of a tensor file's header and first data, hashes made to agree
        f = bad / data.draw(st.sampled_from(CK_FILES))
        raw = bytearray(f.read_bytes())
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, min(len(raw), 4096) - 1))] = data.draw(st.integers(0, 255))
        f.write_bytes(bytes(raw))
        _rehash(bad)
    _load_or_user_error(load, bad)
    shutil.rmtree(bad)


@_FUZZ
@given(data=st.data())
def test_fuzz_bundle_loader(bundle, tmp_path_factory, data):
    from vqmobile.export import open_bundle

    bad = tmp_path_factory.mktemp("fuzz-bundle")
    shutil.copy2(bundle / "bundle.json", bad / "bundle.json")
    for rel in json.loads((bundle / "bundle.json").read_text())["files"]:  # links: the files themselves stay
        (bad / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(bundle / rel, bad / rel)
    m = json.loads((bad / "bundle.json").read_text())
    _mutate(m, data)
    (bad / "bundle.json").write_text(json.dumps(m))
    _load_or_user_error(open_bundle, bad)
    shutil.rmtree(bad)


def test_full_disk_names_the_output_and_leaves_nothing(tmp_path):
    """A write that fails for a reason the user can fix (here ENOSPC, raised by the writer as the OS would) is a
    one-line UserError naming the output, and removes the temporary folder and the parents it created."""
    import errno

    from vqmobile import atomic

    out = tmp_path / "a" / "b" / "out"

    def full(part: Path):
        part.write_bytes(b"x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match=f"cannot write {out}: No space left on device"):
        atomic.directory(out, lambda tmp: full(tmp / "part"))
    with pytest.raises(UserError, match="cannot write .*chart.png: No space left on device"):
        atomic.write_file(tmp_path / "c" / "chart.png", full)
    assert list(tmp_path.iterdir()) == []
